"""One config seed derives every random stream of every net (init, data order)."""

from __future__ import annotations

import numpy as np
import torch

_STREAMS = {"init": 0, "data": 1, "random": 2}
"""init: the weights; data: the order of the examples; random: what the forward draws (dropout), step by step."""


def derive_seed(seed: int, net_index: int, stream: str) -> int:
    """A 31-bit seed for (config seed, net, stream), independent across nets and streams."""
    return int(np.random.SeedSequence([int(seed), int(net_index), _STREAMS[stream]]).generate_state(1)[0] >> 1)


def epoch_order(data_seed: int, epoch: int, n: int, device="cpu") -> torch.Tensor:
    """The data order of one epoch: a function of (seed, epoch) only, so a resumed run replays it exactly."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([data_seed, epoch]).generate_state(1)[0] >> 1))
    return torch.randperm(n, generator=g).to(device)


def step_seed(random_seed: int, step: int) -> int:
    """The seed of step `step`'s random draws (dropout): a function of (seed, step) only, so a resumed run and a net
    trained beside others draw the same."""
    return int(np.random.SeedSequence([random_seed, step]).generate_state(1)[0] >> 1)
