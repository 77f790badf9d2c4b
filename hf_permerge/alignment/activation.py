"""Activation matching (paper Section 2): match units whose activations on the same inputs agree.

One pass over the data under `no_grad`, accumulating per group only sums, sums of squares and
the cross-product A^T B (of activations shifted to near-zero mean, in float32, totals in float64):
O(n^2) memory, never the d x n activation matrices. Each similarity
(cosine, correlation, negative L2) is a function of those sums. Groups are independent, so
each gets its own Hungarian solve, on worker threads, overlapped with the device work that
follows (the next group's similarity, the next net's statistics: `match_many`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from .base import (
    Matcher,
    batch_slices,
    check_choice,
    check_matching_data,
    check_same_architecture,
    eval_mode,
    model_device,
    model_input,
)
from .hungarian import AssignmentSolver, objective_summary
from .permutations import Permutations
from .spec import PermutationSpec

SIMILARITIES = ("cosine", "correlation", "l2")


def units_as_columns(t: torch.Tensor, axis: int = 1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Units on `axis` -> (rows, units): (N, C, *spatial) with axis 1, (N, tokens, C) with axis 2;
    every other position is a sample of its unit. `mask` (N, tokens), for text: only the rows of real tokens
    (padding is no sample)."""
    if t.ndim == 2 and axis in (1, -1):
        return t
    rows = t.movedim(axis, -1).reshape(-1, t.shape[axis])
    if mask is not None and t.ndim == 3 and axis in (2, -1) and tuple(t.shape[:2]) == tuple(mask.shape):
        rows = rows[mask.reshape(-1)]
    return rows


def group_columns(output: torch.Tensor, group, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A module's output as (rows, units) of one group: its `unit_axis`, only the group's `activation_part` of it
    where the module's output carries other groups too (a fused projection's q | k | v)."""
    if group.activation_part is not None:
        output = output.index_select(
            group.unit_axis, group.activation_part.positions(group.size)[:, 0].to(output.device)
        )
    return units_as_columns(output, group.unit_axis, mask)


def forward_batches(data, models: list[nn.Module], batch_size: int):
    """Batches of the matching data as each model takes them: yields (per-model kwargs, token mask or None).

    `data` is a pixel tensor (N, C, H, W) or a split with `model_inputs(rows)` (a `TokenSplit`: input_ids and
    attention_mask, whose mask says which positions are tokens)."""
    n = len(data)
    for s in batch_slices(n, batch_size):
        if isinstance(data, torch.Tensor):
            yield [{"pixel_values": model_input(m, data[s])} for m in models], None
        elif hasattr(data, "input_ids"):
            inputs = data.model_inputs(s)
            device = model_device(models[0])
            yield [{k: v.to(device) for k, v in inputs.items()} for _ in models], data.token_mask(s).to(device)
        else:
            x = data.pixel_values[s]
            yield [{"pixel_values": model_input(m, x)} for m in models], None


PRODUCTS = {"float32": torch.float32, "float64": torch.float64}
_FLOAT32_ROWS = 1024
"""Rows per float32 product: a conv layer's batch is N x H x W rows, and float32 dot products over
30,000 rows drifted by 1e-4 (measured on a CNN); 1,024 keep them near 1e-6 at no measurable cost."""


@dataclasses.dataclass
class ActivationStatistics:
    """Streaming sums over samples of two nets' activations of one group (n units each).

    Every sum is of *shifted* activations, a - shift_a and b - shift_b, with each unit's shift fixed
    at its mean over the first batch. Shifting changes no similarity, but keeps the sums near zero
    mean, so the centred quantities (covariances, variances) come out without the cancellation of
    `E[ab] - E[a] E[b]`; that is what lets the n x n products run in float32 (`product_dtype`, 2x
    faster than float64 on these CPUs, the bulk of the work) while totals accumulate in float64.
    """

    count: int
    sum_a: torch.Tensor
    sum_b: torch.Tensor
    sumsq_a: torch.Tensor
    sumsq_b: torch.Tensor
    cross: torch.Tensor
    """cross[i, j] = sum over samples of (a_i - shift_a_i) * (b_j - shift_b_j)."""
    shift_a: torch.Tensor | None = None
    shift_b: torch.Tensor | None = None
    product_dtype: torch.dtype = torch.float32

    @classmethod
    def zeros(cls, n: int, device=None, product_dtype: torch.dtype = torch.float32) -> ActivationStatistics:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(0, z(n), z(n), z(n), z(n), z(n, n), product_dtype=product_dtype)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add a batch: a and b are (rows, n) activations of the two nets on the same inputs."""
        dtype = self.product_dtype
        a, b = a.to(dtype), b.to(device=a.device, dtype=dtype)
        if self.shift_a is None:
            self.shift_a, self.shift_b = a.mean(0), b.mean(0)
        a, b = a - self.shift_a, b - self.shift_b
        self.count += a.shape[0]
        self.sum_a += a.sum(0, dtype=torch.float64)
        self.sum_b += b.sum(0, dtype=torch.float64)
        self.sumsq_a += a.square().sum(0, dtype=torch.float64)
        self.sumsq_b += b.square().sum(0, dtype=torch.float64)
        if dtype == torch.float64:
            self.cross.addmm_(a.T, b)
            return
        for rows in range(0, a.shape[0], _FLOAT32_ROWS):  # short float32 sums, each added in float64
            self.cross += torch.mm(a[rows : rows + _FLOAT32_ROWS].T, b[rows : rows + _FLOAT32_ROWS])

    def moments(self) -> dict[str, torch.Tensor]:
        """Means, variances, covariance of the unshifted activations (float64)."""
        m = self._unit_moments()
        return {**m, "cov": self._covariance(m)}

    def _unit_moments(self) -> dict[str, torch.Tensor]:
        """The per-unit part of `moments` (vectors), and `dev_*` = mean - shift."""
        n = max(self.count, 1)
        shift_a = self.shift_a.double() if self.shift_a is not None else torch.zeros_like(self.sum_a)
        shift_b = self.shift_b.double() if self.shift_b is not None else torch.zeros_like(self.sum_b)
        dev_a, dev_b = self.sum_a / n, self.sum_b / n  # mean - shift: small by construction
        return {
            "mean_a": shift_a + dev_a,
            "mean_b": shift_b + dev_b,
            "dev_a": dev_a,
            "dev_b": dev_b,
            "var_a": _variance(self.sumsq_a / n, dev_a),
            "var_b": _variance(self.sumsq_b / n, dev_b),
        }

    def _covariance(self, m: dict) -> torch.Tensor:
        """A new (n, n) covariance; callers turn it into a similarity in place (at n = 8192 each
        n x n temporary costs about a second)."""
        return (self.cross / max(self.count, 1)).addr_(m["dev_a"], m["dev_b"], alpha=-1)

    def similarity(self, kind: str = "cosine") -> torch.Tensor:
        """(n, n) similarity of unit i of net a and unit j of net b.

        cosine (uncentred, as the authors' code): <a_i, b_j> / (|a_i| |b_j|);
        correlation: Pearson's r; l2: minus the mean squared distance. A unit that never
        varies (dead ReLU) gets similarity 0 under cosine / correlation instead of NaN.
        """
        check_choice("similarity", kind, SIMILARITIES)
        m = self._unit_moments()
        mean_a, mean_b, var_a, var_b = m["mean_a"], m["mean_b"], m["var_a"], m["var_b"]
        s = self._covariance(m)
        if kind == "cosine":  # E[a b] / sqrt(E[a^2] E[b^2])
            s.addr_(mean_a, mean_b)
            return _divide_rows_and_columns(s, (var_a + mean_a.square()).sqrt(), (var_b + mean_b.square()).sqrt())
        if kind == "correlation":
            return _divide_rows_and_columns(s, var_a.sqrt(), var_b.sqrt())
        # l2: -(var_a + var_b - 2 cov + (mean_a - mean_b)^2)
        return s.mul_(2).sub_(var_a[:, None]).sub_(var_b[None, :]).sub_((mean_a[:, None] - mean_b[None, :]).square())


def _divide_rows_and_columns(s: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """s[i, j] / (rows[i] cols[j]) in place, and 0 where rows[i] or cols[j] is 0 (a unit that never fires,
    or one whose norm is below the smallest normal float, whose reciprocal would overflow)."""
    tiny = torch.finfo(s.dtype).tiny
    inverse = lambda v: torch.where(v > tiny, v.reciprocal(), torch.zeros_like(v))  # noqa: E731
    return s.mul_(inverse(rows)[:, None]).mul_(inverse(cols)[None, :])


def _variance(second_moment: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Variance from the moments of shifted data; a variance lost in rounding error counts as zero."""
    var = second_moment - mean.square()
    return torch.where(var > 1e-10 * second_moment, var, torch.zeros_like(var))


def activation_modules(spec: PermutationSpec, preactivation: bool) -> dict[str, str]:
    """group -> name of the module whose output carries the group's activations."""
    out = {}
    for g in spec.groups:
        name = g.preactivation if preactivation else g.activation
        if name is None and preactivation:
            raise ValueError(f"group {g.name!r} names no pre-activation module; use preactivation=False")
        if name is None:
            raise ValueError(
                f"group {g.name!r} names no module whose output carries its activations (e.g. its "
                "nonlinearity is a functional call): wrap it in an nn.Module, or use matcher='weight'"
            )
        out[g.name] = name
    return out


def _register_hooks(model: nn.Module, names: dict[str, str], make_hook) -> list:
    """A forward hook `make_hook(group)` on the module carrying each group's activations; the handles."""
    modules = dict(model.named_modules())
    handles = []
    for g, name in names.items():
        if name not in modules:
            for h in handles:
                h.remove()
            raise ValueError(f"group {g!r} names module {name!r}, which the model does not have")
        handles.append(modules[name].register_forward_hook(make_hook(g)))
    return handles


@torch.no_grad()
def activation_statistics(
    model_a: nn.Module,
    model_b: nn.Module,
    pixel_values,
    spec: PermutationSpec,
    preactivation: bool = False,
    batch_size: int = 1000,
    products: str = "float32",
    groups: list[str] | None = None,
) -> dict[str, ActivationStatistics]:
    """One pass over the data through both nets (eval mode), streaming statistics per group.

    `pixel_values`: images (N, C, H, W), or a split (`forward_batches`: a `TokenSplit` of sequences, whose padding
    is no sample). Forward hooks on model_a store its activations; model_b's hooks fold each group into the
    statistics as soon as its own activations arrive, then drop model_a's, bounding memory: a batch's tokens x
    units of one group at a time, never all tokens. `groups`: only these (default all); each forward stops as
    soon as it has produced their activations (a pass for the early layers runs only those layers).
    """
    names = activation_modules(spec, preactivation)
    if groups is not None:
        names = {g: names[g] for g in groups}
    check_choice("products", products, tuple(PRODUCTS))
    stats = {g: ActivationStatistics.zeros(spec[g].size, model_device(model_a), PRODUCTS[products]) for g in names}
    held: dict[str, torch.Tensor] = {}
    batch: dict = {"mask": None, "seen_a": set(), "seen_b": set()}
    stop_early = groups is not None

    def seen(which: str, group: str) -> None:
        batch[which].add(group)
        if stop_early and len(batch[which]) == len(names):
            raise _EnoughActivations

    def hook_a(group):
        def hook(module, inputs, output):
            # a copy, safe from in-place ops later (an in-place ReLU on this output)
            held[group] = group_columns(output, spec[group], batch["mask"]).to(PRODUCTS[products], copy=True)
            seen("seen_a", group)

        return hook

    def hook_b(group):
        def hook(module, inputs, output):
            stats[group].update(held.pop(group), group_columns(output, spec[group], batch["mask"]))
            seen("seen_b", group)

        return hook

    handles = []
    try:
        handles += _register_hooks(model_a, names, hook_a)
        handles += _register_hooks(model_b, names, hook_b)
        with eval_mode(model_a, model_b):
            batches = forward_batches(pixel_values, [model_a, model_b], batch_size)
            total = -(-len(pixel_values) // batch_size)
            # a bar only on a terminal (disable=None), for the long ones: wide nets on the CPU take minutes
            for (inputs_a, inputs_b), mask in tqdm(
                batches,
                total=total,
                desc="activation statistics",
                leave=False,
                mininterval=2.0,
                delay=2.0,
                disable=None,
            ):
                batch["mask"] = mask
                for model, inputs, which in ((model_a, inputs_a, "seen_a"), (model_b, inputs_b, "seen_b")):
                    batch[which] = set()
                    try:
                        model(**inputs)
                    except _EnoughActivations:
                        pass
    finally:
        for h in handles:
            h.remove()
    return stats


class _EnoughActivations(Exception):
    """Raised by a hook once a forward has produced every activation a pass needs: the rest is not run."""


def statistics_passes(
    spec: PermutationSpec, max_bytes: int | None, order: dict[str, int] | None = None
) -> list[list[str]]:
    """The groups in passes over the data whose statistics (an n x n float64 cross-product per group) fit in
    `max_bytes` each; an attention coupling's groups share a pass (they are solved together). Groups are taken by
    `order` (group -> position of its activation module in the forward; default spec order), so that each pass
    stops as early as it can. None: one pass. A group (or coupling) larger than the bound alone is an error."""
    if max_bytes is None:
        return [list(spec.names)]
    units, done = [], set()
    for g in spec.names:
        if g not in done:
            unit = list(spec.coupling_of(g) or (g,))
            done.update(unit)
            units.append(unit)
    if order is not None:
        units.sort(key=lambda unit: max(order.get(g, 0) for g in unit))
    passes, current, used = [], [], 0
    for unit in units:
        need = sum(statistics_bytes(spec[g].size) for g in unit)
        if need > max_bytes:
            raise ValueError(
                f"the statistics of {', '.join(unit)} need {need / 2**20:.0f} MiB, more than "
                f"max_statistics_mb={max_bytes / 2**20:.0f}; raise max_statistics_mb"
            )
        if current and used + need > max_bytes:
            passes.append(current)
            current, used = [], 0
        current += unit
        used += need
    return passes + [current] if current else passes


def statistics_bytes(n: int) -> int:
    """Memory of one group's `ActivationStatistics`: the n x n cross-products and four n-vectors, float64, and
    the similarity computed from them."""
    return 8 * (2 * n * n + 6 * n)


@torch.no_grad()
def pairwise_activation_statistics(
    models: list[nn.Module],
    pixel_values: torch.Tensor,
    spec: PermutationSpec,
    preactivation: bool = False,
    batch_size: int = 1000,
    products: str = "float32",
) -> dict[tuple[int, int], dict[str, ActivationStatistics]]:
    """`activation_statistics` of every pair i < j of `models`, in one pass over `pixel_values`: each batch goes
    through every net once, not once per pair (N forward passes instead of N (N - 1)).

    Every net's activations of a batch are held at once, so batches are `2 * batch_size // N` images: about the
    memory of a pass over two nets at `batch_size`. The sums do not depend on the batches (up to rounding)."""
    names = activation_modules(spec, preactivation)
    check_choice("products", products, tuple(PRODUCTS))
    n = len(models)
    device = model_device(models[0])
    stats = {
        (i, j): {g: ActivationStatistics.zeros(spec[g].size, device, PRODUCTS[products]) for g in names}
        for i in range(n)
        for j in range(i + 1, n)
    }
    held: dict[tuple[int, str], torch.Tensor] = {}
    batch: dict = {"mask": None}

    def hook(i: int, group: str):
        def store(module, inputs, output):
            # a copy, safe from in-place ops later (an in-place ReLU on this output)
            held[i, group] = group_columns(output, spec[group], batch["mask"]).to(PRODUCTS[products], copy=True)

        return store

    handles = []
    try:
        for i, model in enumerate(models):
            handles += _register_hooks(model, names, lambda g, i=i: hook(i, g))
        with eval_mode(*models):
            size = max(1, 2 * batch_size // n)
            batches = forward_batches(pixel_values, models, size)
            for inputs, mask in tqdm(
                batches,
                total=-(-len(pixel_values) // size),
                desc=f"activation statistics, {n} nets",
                leave=False,
                mininterval=2.0,
                delay=2.0,
                disable=None,
            ):
                batch["mask"] = mask
                for model, kwargs in zip(models, inputs):
                    model(**kwargs)
                for (i, j), pair in stats.items():
                    for g in names:
                        pair[g].update(held[i, g], held[j, g])
                held.clear()
    finally:
        for h in handles:
            h.remove()
    return stats


@dataclasses.dataclass
class ActivationMatcher(Matcher):
    """Match units by the similarity of their activations on `num_examples` examples of `data`.

    similarity: "cosine" (the paper's default, uncentred), "correlation" (centred) or "l2"
    (negative squared distance). preactivation: match before the ReLU instead of after it.
    The subset of `data` is fixed by `seed`; `batch_size` bounds memory and changes nothing else.
    products: dtype of the n x n products of (shifted) activations, "float32" (default: 2x faster on
    the CPU, similarities within ~1e-6 of float64) or "float64"; totals are float64 either way.
    """

    name: ClassVar[str] = "activation"
    similarity: str = "cosine"
    preactivation: bool = False
    num_examples: int | None = 10000
    batch_size: int = 1000
    seed: int = 0
    products: str = "float32"
    max_statistics_mb: int | None = None

    def __post_init__(self):
        check_choice("similarity", self.similarity, SIMILARITIES)
        check_choice("products", self.products, tuple(PRODUCTS))
        if self.max_statistics_mb is not None and self.max_statistics_mb < 1:
            raise ValueError(f"max_statistics_mb={self.max_statistics_mb} must be >= 1 (or None: no bound)")

    def match(self, model_a: nn.Module, model_b: nn.Module, data=None) -> Permutations:
        return self.match_many(model_a, [model_b], data)[0]

    def match_many(self, model_a: nn.Module, others, data=None) -> list[Permutations]:
        """`[match(model_a, b, data) for b in others]`, with the Hungarian solves overlapped.

        Each group's assignment is submitted to worker threads as soon as its similarity is
        ready, and the caller goes on: the next group's similarity, then the next net's pass
        over the data, run while the earlier nets' assignments are being solved. With
        `max_statistics_mb`, the groups are gathered in several passes, each holding at most that much of
        statistics (`statistics_passes`); a pass's solves finish and its similarities are dropped before the next.
        """
        check_matching_data(data, model_a)
        split = data.subset(self.num_examples, self.seed).to(model_device(model_a))
        bound = None if self.max_statistics_mb is None else self.max_statistics_mb * 2**20
        summaries: list[dict] = [{} for _ in others]
        perms: list[dict] = [{} for _ in others]
        with AssignmentSolver() as solver:
            held = []  # (net, group, similarity) whose solve is not collected yet
            for k, model_b in enumerate(others):
                spec = check_same_architecture(model_a, model_b)
                passes = statistics_passes(spec, bound, self._forward_order(model_a, spec))
                for groups in passes:
                    stats = activation_statistics(
                        model_a,
                        model_b,
                        matching_inputs(split),
                        spec,
                        self.preactivation,
                        self.batch_size,
                        self.products,
                        groups if len(passes) > 1 else None,
                    )
                    sims = {}
                    for g in groups:
                        sims[g] = stats.pop(g).similarity(self.similarity)
                        held.append((k, g, sims[g]))
                        coupled = spec.coupling_of(g)
                        if coupled is None:
                            solver.submit((k, g), sims[g], spec[g].blocks, spec[g].rigid_runs)
                        elif all(n in sims for n in coupled):  # an attention layer's groups move their heads together
                            solver.submit_coupled(
                                tuple((k, n) for n in coupled),
                                [sims[n] for n in coupled],
                                spec[g].blocks,
                                [spec[n].rigid_runs for n in coupled],
                            )
                    del sims
                    if len(passes) > 1:
                        held = self._collect(solver, held, summaries, perms)
            self._collect(solver, held, summaries, perms)
        return [Permutations(p, self._header(s, split)) for p, s in zip(perms, summaries)]

    def _forward_order(self, model: nn.Module, spec: PermutationSpec) -> dict[str, int]:
        """Group -> position of its activation module among the model's modules (registration order, which is the
        order a transformer's forward reaches them)."""
        positions = {name: i for i, (name, _) in enumerate(model.named_modules())}
        return {g: positions.get(m, 0) for g, m in activation_modules(spec, self.preactivation).items()}

    @staticmethod
    def _collect(solver, held, summaries, perms) -> list:
        """Wait for the solves of `held`; keep each group's permutation and objective, drop its similarity."""
        solved = solver.results()
        for k, g, sim in held:
            perms[k][g] = solved[(k, g)]
            summaries[k][g] = objective_summary(sim, solved[(k, g)])
        return []


def matching_inputs(split):
    """What `forward_batches` takes of a split: its pixels, or the token split itself."""
    return split if hasattr(split, "input_ids") else split.pixel_values
