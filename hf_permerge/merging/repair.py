"""REPAIR and BatchNorm reset: undo the variance collapse of averaged networks.

Averaging aligned nets shrinks the spread of each hidden unit's pre-activations, more with depth. Both
remedies change a merged model in place, from a few thousand training images:

- `repair` (Jordan et al. 2022): for each group's pre-activation module, fold into its weight and bias the
  affine map that takes the merged net's per-unit mean and std to the interpolation of the endpoints',
  layer by layer in forward order. A layer without a bias gets only the scale closest to that map
  (s = a + b E[z] / E[z^2]): adding a bias would change the architecture. That can cost accuracy, so it
  warns, and the card names the layers only rescaled (REPRODUCING.md). Groups tied by residual additions
  have no single pre-activation module: they are corrected only through `modules=` (a traced spec's
  `repair_modules`).
- `reset_bn`: recompute every BatchNorm's running statistics on training data (train-mode passes of the
  BatchNorm layers only, `momentum=None`): interpolated statistics are not those of the interpolated net.

Unit axis: 1 for convolutions and BatchNorm, the last for Linear and LayerNorm; every position counts as
a sample of its unit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ..alignment.base import batch_slices, eval_mode, model_input
from ..alignment.spec import PermutationSpec
from ..data.tensors import TensorSplit
from .inputs import as_tensor_split

logger = logging.getLogger(__name__)

REPAIR_MODES = ("repair", "reset_bn")
DEFAULT_NUM_EXAMPLES = 5000
DEFAULT_BATCH_SIZE = 500

_AFFINE_LAST = (nn.Linear, nn.LayerNorm)
_AFFINE_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def check_repair_mode(repair: str | None) -> None:
    if repair is not None and repair not in REPAIR_MODES:
        raise ValueError(f"repair={repair!r} is not supported; choose one of {list(REPAIR_MODES)} or None")


def unit_axis(module: nn.Module) -> int:
    """The axis of a module's output that carries its units."""
    return -1 if isinstance(module, _AFFINE_LAST) else 1


@dataclasses.dataclass
class UnitStatistics:
    """Streaming per-unit mean and (population) std of one module's outputs.

    Each batch contributes its own mean and centred sum of squares (`torch.var_mean`, in the
    activations' dtype, so no cancellation), merged into float64 totals with Chan et al.'s formula.
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor
    """Sum over samples of squared deviations from the mean."""

    @classmethod
    def zeros(cls, n: int, device=None) -> UnitStatistics:
        return cls(
            0, torch.zeros(n, dtype=torch.float64, device=device), torch.zeros(n, dtype=torch.float64, device=device)
        )

    def update(self, rows: torch.Tensor) -> None:
        n_b = rows.shape[0]
        if n_b == 0:
            return
        var_b, mean_b = torch.var_mean(rows, dim=0, correction=0)
        mean_b, m2_b = mean_b.to(torch.float64), var_b.to(torch.float64) * n_b
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + m2_b + delta.square() * (self.count * n_b / total)
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / max(self.count, 1)).clamp_min(0).sqrt()


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the measured module has run."""


def _rows(output, name: str, axis: int) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"module {name!r} returns {type(output).__name__}, not a tensor; REPAIR needs a module "
            "whose output carries the units"
        )
    return output.detach().movedim(axis, -1).reshape(-1, output.shape[axis])


@torch.no_grad()
def unit_statistics(
    model: nn.Module,
    modules: Sequence[str],
    pixel_values: torch.Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stop_after: str | None = None,
) -> dict[str, UnitStatistics]:
    """Per-unit statistics of the outputs of `modules` over `pixel_values` (eval mode, streaming).

    `stop_after`: end each forward pass as soon as that module has run (the layers after it are not needed).
    """
    named = dict(model.named_modules())
    stats: dict[str, UnitStatistics] = {}

    def hook(name, axis):
        def fn(module, inputs, output):
            rows = _rows(output, name, axis)
            if name not in stats:
                stats[name] = UnitStatistics.zeros(rows.shape[1], rows.device)
            stats[name].update(rows)
            if name == stop_after:
                raise _Stop

        return fn

    handles = [named[m].register_forward_hook(hook(m, unit_axis(named[m]))) for m in modules]
    try:
        with eval_mode(model):
            for s in batch_slices(len(pixel_values), batch_size):
                try:
                    model(pixel_values=model_input(model, pixel_values[s]))
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return stats


def _pixels(data, model: nn.Module, num_examples: int | None, seed: int) -> torch.Tensor:
    """The fixed (seeded) subset of `num_examples` images of a TensorSplit, `datasets.Dataset` or pixel tensor."""
    if isinstance(data, torch.Tensor):
        data = TensorSplit(data, torch.zeros(len(data), dtype=torch.long, device=data.device), "tensor")
    return as_tensor_split(data, model).subset(num_examples, seed).pixel_values


def repair_modules(spec: PermutationSpec) -> list[str]:
    """The modules REPAIR corrects by default: each group's pre-activation module, where it has one
    (not attention projections, `blocks` > 1: their outputs are factors of attention logits, not pre-activations)."""
    return [g.preactivation for g in spec.groups if g.preactivation is not None and g.blocks == 1]


def _check_foldable(model: nn.Module, modules: Sequence[str]) -> None:
    named = dict(model.named_modules())
    for m in modules:
        if m not in named:
            raise ValueError(f"REPAIR: the model has no module {m!r}")
        module = named[m]
        if isinstance(module, nn.modules.conv._ConvTransposeNd) or not isinstance(module, _AFFINE_LAST + _AFFINE_FIRST):
            raise ValueError(
                f"REPAIR cannot fold a per-unit correction into {m!r} ({type(module).__name__}); it "
                "corrects Linear, Conv, BatchNorm, LayerNorm and GroupNorm outputs"
            )
        if (
            isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))
            and getattr(module, "weight", None) is None
        ):
            raise ValueError(f"REPAIR cannot correct {m!r}: the norm has no affine weight to fold the scale into")


def _forward_order(model: nn.Module, modules: Sequence[str], pixel_values: torch.Tensor) -> list[str]:
    """`modules` in the order a forward pass runs them (the order REPAIR must go in)."""
    named = dict(model.named_modules())
    order: list[str] = []
    handles = [
        named[m].register_forward_hook(lambda mod, i, o, m=m: order.append(m) if m not in order else None)
        for m in modules
    ]
    try:
        with torch.no_grad(), eval_mode(model):
            model(pixel_values=model_input(model, pixel_values[:2]))
    finally:
        for h in handles:
            h.remove()
    missing = [m for m in modules if m not in order]
    if missing:
        raise ValueError(f"REPAIR: modules {missing} did not run in a forward pass")
    return order


@torch.no_grad()
def _fold(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make the module's output `scale * output + shift` per unit (scale alone when it has no bias)."""
    weight, bias = module.weight, getattr(module, "bias", None)
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):  # output units on the weight's axis 0
        weight.mul_(scale.to(weight.dtype).reshape(-1, *[1] * (weight.ndim - 1)))
    else:  # norms: units on the affine's last axis
        weight.mul_(scale.to(weight.dtype))
    if bias is not None:
        bias.mul_(scale.to(bias.dtype)).add_(shift.to(bias.dtype))


def _correction(current: UnitStatistics, mean_t: torch.Tensor, std_t: torch.Tensor, has_bias: bool):
    """(scale, shift) taking the current statistics to the target; a constant unit keeps its scale.

    Without a bias there is no shift: the least-squares scale for the affine map a z + b (see the module
    docstring), which is a when the unit's mean is 0 and stays a scale of the unit's own output.
    """
    scale = torch.where(current.std > 1e-8, std_t / current.std.clamp_min(1e-8), torch.ones_like(std_t))
    shift = mean_t - scale * current.mean
    if has_bias:
        return scale, shift
    second = current.std.square() + current.mean.square()
    scale = torch.where(current.std > 1e-8, scale + shift * current.mean / second.clamp_min(1e-16), scale)
    return scale, torch.zeros_like(scale)


@torch.no_grad()
def repair(
    model: nn.Module,
    endpoints: Sequence[nn.Module],
    data,
    weights: Sequence[float] | None = None,
    modules: Sequence[str] | None = None,
    spec: PermutationSpec | None = None,
    num_examples: int | None = DEFAULT_NUM_EXAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
) -> dict:
    """REPAIR `model` (the merge of `endpoints`, units lined up) in place; see the module docstring.

    weights: the merge weights (default uniform: `merge_all`); for `merge(alpha)`: [1 - alpha, alpha].
    modules: the modules to correct, default the spec's pre-activation modules (`repair_modules(spec)`).
    data: a TensorSplit, a `datasets.Dataset` or a pixel tensor; its fixed subset of `num_examples`
    (seeded) is used. Returns per module {"scale", "shift"} summaries.
    """
    weights = [1.0 / len(endpoints)] * len(endpoints) if weights is None else [float(w) for w in weights]
    if len(weights) != len(endpoints):
        raise ValueError(f"REPAIR needs one weight per endpoint: {len(weights)} weights, {len(endpoints)} endpoints")
    if modules is None:
        spec = spec or model.permutation_spec()
        modules = repair_modules(spec)
    if not modules:
        raise ValueError(
            f"REPAIR: {type(model).__name__} has no group with a pre-activation module to correct "
            "(residual groups have none); pass modules=[...] or use repair='reset_bn' "
            "(`--repair reset_bn` on the command line)"
        )
    _check_foldable(model, modules)
    x = _pixels(data, model, num_examples, seed)
    modules = _forward_order(model, list(modules), x)
    targets = [unit_statistics(e, modules, x, batch_size) for e in endpoints]
    named = dict(model.named_modules())
    summary = {}
    for m in modules:
        mean_t = sum(w * t[m].mean for w, t in zip(weights, targets))
        std_t = sum(w * t[m].std for w, t in zip(weights, targets))
        current = unit_statistics(model, [m], x, batch_size, stop_after=m)[m]
        has_bias = getattr(named[m], "bias", None) is not None
        scale, shift = _correction(current, mean_t, std_t, has_bias)
        _fold(named[m], scale, shift)
        summary[m] = {"scale_mean": scale.mean().item(), "shift_abs_mean": shift.abs().mean().item(), "shift": has_bias}
    scale_only = [m for m, s in summary.items() if not s["shift"]]
    if scale_only:
        logger.warning(
            "REPAIR: %d of %d corrected layers have no bias (%s), so their units were only rescaled, not "
            "re-centred: scale-only REPAIR, which can also cost a little accuracy. Compare with the "
            "unrepaired merge, or train with biases (model.bias=true)",
            len(scale_only),
            len(summary),
            ", ".join(scale_only),
        )
    return summary


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def require_batchnorm(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers; none is a user's mistake (reset_bn asked of a model without BatchNorm)."""
    bns = batchnorm_layers(model)
    if not bns:
        raise ValueError(
            f"reset_bn: {type(model).__name__} has no BatchNorm layers, so there are no statistics to "
            "reset; use REPAIR instead (repair='repair' in Python, `--repair repair` on the command line)"
        )
    return bns


@torch.no_grad()
def reset_bn_statistics(
    model: nn.Module,
    data,
    num_examples: int | None = DEFAULT_NUM_EXAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
) -> nn.Module:
    """Recompute every BatchNorm's running statistics on `data` (in place); see the module docstring.

    Only whole batches are used (a last, smaller batch would be weighted like a full one).
    """
    bns = require_batchnorm(model)
    no_stats = [type(m).__name__ for m in bns if not m.track_running_stats]
    if no_stats:
        raise ValueError("reset_bn: some BatchNorm layers keep no running statistics (track_running_stats=False)")
    x = _pixels(data, model, num_examples, seed)
    n_full = len(x) // batch_size
    slices = list(batch_slices(n_full * batch_size if n_full else len(x), batch_size))
    momenta = [m.momentum for m in bns]
    with eval_mode(model):
        try:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over batches
                m.train()
            for s in slices:
                model(pixel_values=model_input(model, x[s]))
        finally:
            for m, momentum in zip(bns, momenta):
                m.momentum = momentum
    return model


def apply_repair(
    mode: Literal["repair", "reset_bn"],
    model: nn.Module,
    endpoints: Sequence[nn.Module],
    data,
    weights: Sequence[float] | None = None,
    **settings,
) -> list[str]:
    """Run `repair` or `reset_bn_statistics` on a merged model (in place); returns the modules REPAIR could only
    rescale (no bias to shift), for the record."""
    check_repair_mode(mode)
    if mode == "reset_bn":
        reset_bn_statistics(model, data, **settings)
        return []
    summary = repair(model, endpoints, data, weights, **settings)
    return [m for m, s in summary.items() if not s["shift"]]
