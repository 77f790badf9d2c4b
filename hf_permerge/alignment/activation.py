"""Activation matching (paper Section 2): match units whose activations on the same inputs agree.

One pass over the data under `no_grad`, accumulating per group only sums, sums of squares and
the cross-product A^T B: O(n^2) memory, never the d x n activation matrices. Each similarity
(cosine, correlation, negative L2) is a function of those sums. Groups are independent, so
each gets its own Hungarian solve, on worker threads, overlapped with the device work that
follows (the next group's similarity, the next net's statistics: `match_many`).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from .hungarian import AssignmentSolver
from .matchers import (Matcher, as_tensor_split, batch_slices, check_choice, check_same_architecture, eval_mode,
                       model_device, model_input, register_matcher)
from .permutations import Permutations
from .spec import PermutationSpec

SIMILARITIES = ("cosine", "correlation", "l2")


def units_as_columns(t: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """Units on `axis` -> (rows, units): (N, C, *spatial) with axis 1, (N, tokens, C) with axis 2;
    every other position is a sample of its unit."""
    if t.ndim == 2 and axis in (1, -1):
        return t
    return t.movedim(axis, -1).reshape(-1, t.shape[axis])


@dataclasses.dataclass
class ActivationStatistics:
    """Streaming float64 sums over samples of two nets' activations of one group (n units each)."""

    count: int
    sum_a: torch.Tensor
    sum_b: torch.Tensor
    sumsq_a: torch.Tensor
    sumsq_b: torch.Tensor
    cross: torch.Tensor
    """cross[i, j] = sum over samples of a_i * b_j."""

    @classmethod
    def zeros(cls, n: int, device=None) -> "ActivationStatistics":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(0, z(n), z(n), z(n), z(n), z(n, n))

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add a batch: a and b are (rows, n) activations of the two nets on the same inputs.

        Products in float64: float32 ones were 1.5x faster on the CPU, but the centred similarity
        (correlation) subtracts nearly equal sums, and lost 1e-4 of its value on CNNs.
        """
        a, b = a.to(torch.float64), b.to(device=a.device, dtype=torch.float64)
        self.count += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sumsq_a += a.square().sum(0)
        self.sumsq_b += b.square().sum(0)
        self.cross.addmm_(a.T, b)

    def similarity(self, kind: str = "cosine") -> torch.Tensor:
        """(n, n) similarity of unit i of net a and unit j of net b.

        cosine (uncentred, as the authors' code): <a_i, b_j> / (|a_i| |b_j|);
        correlation: Pearson's r; l2: minus the mean squared distance. A unit that never
        varies (dead ReLU) gets similarity 0 under cosine / correlation instead of NaN.
        """
        check_choice("similarity", kind, SIMILARITIES)
        n = max(self.count, 1)
        if kind == "cosine":
            return _ratio(self.cross, torch.outer(self.sumsq_a.sqrt(), self.sumsq_b.sqrt()))
        if kind == "correlation":
            mean_a, mean_b = self.sum_a / n, self.sum_b / n
            cov = self.cross / n - torch.outer(mean_a, mean_b)
            return _ratio(cov, torch.outer(_std(self.sumsq_a / n, mean_a), _std(self.sumsq_b / n, mean_b)))
        return -(self.sumsq_a[:, None] + self.sumsq_b[None, :] - 2 * self.cross) / n


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def _std(second_moment: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Standard deviation from moments; a variance lost in cancellation error counts as zero."""
    var = second_moment - mean.square()
    return torch.where(var > 1e-10 * second_moment, var, torch.zeros_like(var)).sqrt()


def activation_modules(spec: PermutationSpec, preactivation: bool) -> dict[str, str]:
    """group -> name of the module whose output carries the group's activations."""
    out = {}
    for g in spec.groups:
        name = g.preactivation if preactivation else g.activation
        if name is None and preactivation:
            raise ValueError(f"group {g.name!r} names no pre-activation module; use preactivation=False")
        if name is None:
            raise ValueError(f"group {g.name!r} names no module whose output carries its activations (e.g. its "
                             "nonlinearity is a functional call): wrap it in an nn.Module, or use matcher='weight'")
        out[g.name] = name
    return out


@torch.no_grad()
def activation_statistics(model_a: nn.Module, model_b: nn.Module, pixel_values: torch.Tensor,
                          spec: PermutationSpec, preactivation: bool = False, batch_size: int = 1000
                          ) -> dict[str, ActivationStatistics]:
    """One pass over `pixel_values` through both nets (eval mode), streaming statistics per group.

    Forward hooks on model_a store its activations; model_b's hooks fold each group into the
    statistics as soon as its own activations arrive, then drop model_a's, bounding memory.
    """
    names = activation_modules(spec, preactivation)
    stats = {g: ActivationStatistics.zeros(spec[g].size, model_device(model_a)) for g in names}
    held: dict[str, torch.Tensor] = {}

    def hook_a(group):
        def hook(module, inputs, output):
            held[group] = units_as_columns(output, spec[group].unit_axis).to(torch.float64)  # a copy: safe from in-place ops later
        return hook

    def hook_b(group):
        def hook(module, inputs, output):
            stats[group].update(held.pop(group), units_as_columns(output, spec[group].unit_axis))
        return hook

    modules_a, modules_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    handles = []
    try:
        for g, name in names.items():
            if name not in modules_a:
                raise ValueError(f"group {g!r} names module {name!r}, which the model does not have")
            handles.append(modules_a[name].register_forward_hook(hook_a(g)))
            handles.append(modules_b[name].register_forward_hook(hook_b(g)))
        with eval_mode(model_a, model_b):
            for s in batch_slices(len(pixel_values), batch_size):
                x = pixel_values[s]
                model_a(pixel_values=model_input(model_a, x))
                model_b(pixel_values=model_input(model_b, x))
    finally:
        for h in handles:
            h.remove()
    return stats


@register_matcher
@dataclasses.dataclass
class ActivationMatcher(Matcher):
    """Match units by the similarity of their activations on `num_examples` examples of `data`.

    similarity: "cosine" (the paper's default, uncentred), "correlation" (centred) or "l2"
    (negative squared distance). preactivation: match before the ReLU instead of after it.
    The subset of `data` is fixed by `seed`; `batch_size` bounds memory and changes nothing else.
    """

    name: ClassVar[str] = "activation"
    similarity: str = "cosine"
    preactivation: bool = False
    num_examples: int | None = 10000
    batch_size: int = 1000
    seed: int = 0

    def __post_init__(self):
        check_choice("similarity", self.similarity, SIMILARITIES)

    def match(self, model_a: nn.Module, model_b: nn.Module, data=None) -> Permutations:
        return self.match_many(model_a, [model_b], data)[0]

    def match_many(self, model_a: nn.Module, others, data=None) -> list[Permutations]:
        """`[match(model_a, b, data) for b in others]`, with the Hungarian solves overlapped.

        Each group's assignment is submitted to worker threads as soon as its similarity is
        ready, and the caller goes on: the next group's similarity, then the next net's pass
        over the data, run while the earlier nets' assignments are being solved.
        """
        split = as_tensor_split(data, model_a).subset(self.num_examples, self.seed).to(model_device(model_a))
        similarities = []
        with AssignmentSolver() as solver:
            for k, model_b in enumerate(others):
                spec = check_same_architecture(model_a, model_b)
                stats = activation_statistics(model_a, model_b, split.pixel_values, spec, self.preactivation,
                                              self.batch_size)
                similarities.append({})
                for g in spec.names:
                    similarities[k][g] = stats.pop(g).similarity(self.similarity)
                    solver.submit((k, g), similarities[k][g])
            solved = solver.results()
        out = []
        for k, sims in enumerate(similarities):
            perms = {g: solved[(k, g)] for g in sims}
            out.append(Permutations(perms, self._info(sims, perms, split)))
        return out
