"""Merging proper: nets permuted onto net 0 (or not, for vanilla averaging), averaged, repaired if asked."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from ..alignment import Permutations
from ..alignment.spec import apply_permutations
from .merge_data import GIVEN, MergeData
from .nets import Nets
from .repair import apply_repair, check_repair_mode, require_batchnorm

Alignment = Callable[[], list[Permutations]]
"""The merger's permutations, one per net, or a RuntimeError when there are none yet."""


def average_state_dicts(states: list[dict], weights: list[float]) -> dict:
    """Weighted average of state dicts, summed in at least fp32 and returned in each tensor's own dtype (bf16 in,
    bf16 out); integer buffers (BatchNorm's counter) are taken from the first."""
    out = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            acc = torch.promote_types(ref.dtype, torch.float32)
            out[key] = sum(w * s[key].to(acc) for w, s in zip(weights, states)).to(ref.dtype)
        else:
            out[key] = ref.clone()
    return out


def permuted_state(
    nets: Nets, alignment: Alignment, i: int, checkpoint: str | None = None, permute: bool = True
) -> dict:
    nets.check_net(i)
    state = nets.load(i, checkpoint).state_dict()
    if not permute or i == 0:
        return state
    return apply_permutations(nets.spec, state, alignment()[i])


def permuted(nets: Nets, alignment: Alignment, i: int, checkpoint: str | None = None):
    nets.check_net(i)
    return alignment()[i].apply(nets.load(i, checkpoint), nets.spec)


def check_repair(nets: Nets, repair: str | None) -> None:
    check_repair_mode(repair)
    if repair is not None and nets.is_text(nets.load(0)):
        raise ValueError(
            f"{repair}: {type(nets.load(0)).__name__} is a LayerNorm transformer, which admits neither repair: it "
            "has no BatchNorm statistics to reset, and REPAIR's per-unit correction cannot be folded into its "
            "embeddings and attention; merge it without --repair / repair=... (its norms already rescale each token)"
        )
    if repair == "reset_bn":
        require_batchnorm(nets.load(0))


def merge_nets(
    nets: Nets,
    alignment: Alignment,
    data: MergeData,
    members: list[int],
    weights: list[float],
    checkpoint: str,
    permute: bool,
    repair,
    repair_data,
    repair_examples,
    alpha: float | None,
):
    """(the weighted average of `members` (net 0 as it is, the others permuted onto it unless not `permute`),
    repaired if asked; its settings for merge_config.json)."""
    check_repair(nets, repair)
    states = [permuted_state(nets, alignment, i, checkpoint, permute) for i in members]
    merged = copy.deepcopy(nets.load(0, checkpoint))
    merged.load_state_dict(average_state_dicts(states, weights))
    scale_only = []
    if repair is not None:
        endpoints = (
            [
                permuted(nets, alignment, i, checkpoint) if permute and i > 0 else nets.load(i, checkpoint)
                for i in members
            ]
            if repair == "repair"
            else []
        )
        examples = (
            data.tensor_split(nets, repair_data, repair_examples)
            if repair_data is not None
            else data.default(nets, "repair", repair_examples)
        )
        # a traced spec knows every branch's last affine layer (residual streams included): REPAIR them all
        sites = (
            {"modules": list(nets.traced.repair_modules)}
            if repair == "repair" and nets.traced is not None and nets.traced.repair_modules
            else {}
        )
        scale_only = apply_repair(repair, merged, endpoints, examples, weights, num_examples=repair_examples, **sites)
    settings = {
        "alpha": alpha,
        "checkpoint": checkpoint,
        "nets": members,
        "permuted": permute,
        **({"repair_scale_only": scale_only} if scale_only else {}),
    }
    if repair:
        settings.update(
            repair=repair,
            repair_examples=repair_examples,
            repair_data=(data.label() or "the pair's training split") if repair_data is None else GIVEN,
        )
    return merged, settings
