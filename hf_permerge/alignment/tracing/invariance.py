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
    (eval mode, on `example_inputs`); on failure, the message names the groups that break it.

    A half-precision model (bf16, fp16: how most checkpoints are stored) is checked in float32: its weights and
    floating inputs are upcast for both the reference and the permuted call, so reordered sums round alike and a
    tolerance meant for float32 arithmetic never reports a sound spec as wrong. Only where the model cannot run in
    float32 (a buffer outside the state dict it insists on) is it checked in its own dtype, with a tolerance of
    that dtype's rounding."""
    call, inputs = traceable_call(model, example_inputs)
    state = dict(model.state_dict())
    half = [t.dtype for t in state.values() if t.is_floating_point() and torch.finfo(t.dtype).bits < 32]
    was_training = model.training
    model.eval()
    try:
        if half:
            state32 = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            inputs32 = tuple(x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs)
            try:
                reference = _run(call, state32, inputs32)
                state, inputs = state32, inputs32
            except RuntimeError:  # a dtype the model insists on: its own arithmetic, its own rounding
                reference = call(*inputs)
                rtol = max(rtol, 64 * max(torch.finfo(d).eps for d in half))
        else:
            reference = call(*inputs)

        def differs(perms) -> float:
            out = _run(call, apply_permutations(spec, state, perms), inputs)
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


def _run(call, state, inputs):
    """The wrapped model on `inputs` with its state replaced; tied weights (embeddings and LM head) are both in the
    state, permuted alike."""
    return functional_call(call, {f"model.{k}": v for k, v in state.items()}, inputs, tie_weights=False)
