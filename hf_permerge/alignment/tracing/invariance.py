"""The check that a spec leaves the function unchanged: random permutations, the same outputs."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..permutations import Permutations
from ..spec import PermutationSpec, apply_permutations
from .export import traceable_call


class InvarianceError(AssertionError):
    """A permutation spec under which the model's outputs change; `groups` names the groups that break it."""

    def __init__(self, message: str, groups: list[str]):
        super().__init__(message)
        self.groups = groups


@torch.no_grad()
def check_permutation_invariance(
    model: nn.Module, spec: PermutationSpec, example_inputs=None, seed: int = 0, rtol: float = 1e-4
) -> None:
    """Raise AssertionError unless randomly permuting every group leaves the model's outputs unchanged
    (eval mode, on `example_inputs`); on failure, the message names the groups that break it."""
    call, inputs = traceable_call(model, example_inputs)
    state = dict(model.state_dict())
    was_training = model.training
    model.eval()
    try:
        reference = call(*inputs)

        def differs(perms) -> float:
            out = functional_call(  # tied weights (embeddings and LM head) are both in the state, permuted alike
                call,
                {f"model.{k}": v for k, v in apply_permutations(spec, state, perms).items()},
                inputs,
                tie_weights=False,
            )
            worst = 0.0
            for a, b in zip(reference, out):
                scale = a.abs().max().item() if a.numel() else 0.0
                worst = max(worst, (a - b).abs().max().item() / max(scale, 1e-6) if a.numel() else 0.0)
            return worst

        perms = Permutations.random(spec, seed)
        if differs(perms) <= rtol:
            return
        bad = [g.name for g in spec.groups if differs(Permutations({g.name: perms[g.name]})) > rtol]
    finally:
        model.train(was_training)
    raise InvarianceError(
        f"permuting group(s) {bad or spec.names} of {type(model).__name__} changes its outputs: "
        "the permutation spec is wrong for this model",
        bad or spec.names,
    )
