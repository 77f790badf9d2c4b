"""Weight matching (Git Re-Basin): the data-free matcher, and the linear-matching core it shares.

`solve_linear_matching` maximises  sum over pairs (A, B), over spec-named keys k of  <A[k], pi(B[k])>
by coordinate descent over groups: each group's objective, with every other group's permutation
held fixed, is linear in its own permutation matrix, hence one Hungarian solve. The gradient
matcher (App. B) reuses it with other pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from .base import Matcher, check_same_architecture
from .hungarian import matched_similarity, solve_assignment, solve_coupled
from .permutations import Permutations
from .spec import PermutationSpec, permute_tensor

TensorDict = Mapping[str, torch.Tensor]


def group_similarity(
    spec: PermutationSpec,
    group: str,
    pairs: Sequence[tuple[TensorDict, TensorDict]],
    perms: Mapping[str, torch.Tensor],
    solved: set[str] | None = None,
    dtype: torch.dtype = torch.float64,
    chunk: int | None = None,
) -> torch.Tensor:
    """Group `group`'s objective as a matrix: [i, j] sums <a[k] at unit i, b[k] at unit j> over the pairs and the
    tensors k that carry the group, b's other axes at `perms`, accumulated in `dtype`.

    Each tensor is read from its mapping when needed (a lazily read checkpoint gives one tensor at a time) and
    converted to `dtype` at most `chunk` columns at a time (its units on the rows), so the memory beyond the
    tensors read is one chunk per side. `solved`: the layer-by-layer pass, counting only the tensors whose other
    permuted axes all belong to groups already matched."""
    g = spec[group]
    total = torch.zeros(g.size, g.size, dtype=dtype)
    entries = [(key, axis, None) for key, axis in g.axes] + list(g.parts)
    for a, b in pairs:
        for key, axis, part in entries:
            if key not in a or key not in b:
                continue
            if solved is not None and not spec.groups_on(key) - {group} <= solved:
                continue  # layer-by-layer sweep: this tensor also carries a group not yet matched
            if part is not None and part.within:
                b_k = permute_tensor(spec, key, b[key], perms, except_group=group).movedim(axis, 0)
                add_within(total, g, part, a[key].movedim(axis, 0), b_k, chunk)
                continue
            # every other axis at its current permutation: for a tensor carrying this group on two axes
            # (P W P^T) each axis's term is the objective linearised at the group's current permutation
            b_k = permute_tensor(spec, key, b[key], perms, except_axis=axis, axis_group=group).movedim(axis, 0)
            a_k = a[key].movedim(axis, 0)
            if part is not None:  # the group's own positions of a shared axis (each repeat counts)
                pos = part.positions(g.size)
                a_k, b_k = a_k[pos], b_k[pos]
            a_k, b_k = a_k.reshape(g.size, -1), b_k.reshape(g.size, -1)
            step = chunk or a_k.shape[1] or 1
            for j in range(0, a_k.shape[1], step):
                total.addmm_(a_k[:, j : j + step].to(dtype), b_k[:, j : j + step].to(dtype).T)
    return total


def add_within(total: torch.Tensor, g, part, a_k: torch.Tensor, b_k: torch.Tensor, chunk: int | None = None) -> None:
    """A `within` part's term (both tensors with the axis first; b's with the axis's other groups applied, which
    moved its blocks): slot-block i of a meets what now stands in block i of b, and unit j of every column block
    scores as unit j there (the block map itself is the coupling's, decided by the other terms). At most `chunk`
    columns of each side are converted to `total`'s dtype at a time, as in `group_similarity`."""
    width = g.size // g.blocks
    pos = part.positions(g.size)
    a_k, b_k = a_k[pos].reshape(g.size, -1), b_k[pos].reshape(g.size, -1)
    step = chunk or a_k.shape[1] or 1
    for i in range(g.blocks):
        rows = slice(i * width, (i + 1) * width)
        block = torch.zeros(width, width, dtype=total.dtype)
        for j in range(0, a_k.shape[1], step):
            block.addmm_(a_k[rows, j : j + step].to(total.dtype), b_k[rows, j : j + step].to(total.dtype).T)
        total[rows] += block.repeat(1, g.blocks)


def coordinate_descent(
    spec: PermutationSpec,
    similarity,
    max_iter: int = 100,
    seed: int = 0,
    bottom_up_first: bool = False,
    potentials: dict[str, dict] | None = None,
    keep=lambda similarity, perm: similarity,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Git Re-Basin's coordinate descent over the groups of `spec` (see `solve_linear_matching`), for any source of
    each group's objective: `similarity(group, perms, solved)` gives it as a matrix (`group_similarity`).

    Returns (perms, final): final[g] = keep(g's similarity at the final permutations, perms[g]). A similarity is
    kept from the last time it was computed while none of its neighbours changed since, so only stale groups are
    computed again at the end. `progress`: a bar per pass, counting its groups."""
    perms = {g.name: torch.arange(g.size) for g in spec.groups}
    # A group's objective depends on the other groups it shares a tensor with (not on its own permutation: no
    # tensor carries a group twice). Re-solving it while none of them changed finds the same permutation, which
    # would not be kept (no improvement): skipped. This halves the solves of a one-hidden-layer MLP, whose only
    # group was solved twice per match. A bottom-up solve counts once all its neighbours were solved before it
    # (then it saw every tensor of the group), unless the group is coupled (that pass keeps heads in place).
    # A group on two axes of one tensor is its own neighbour: its objective is not linear (two parts of one
    # axis are: they are different positions).
    neighbours: dict[str, set[str]] = {g: set() for g in spec.names}
    for axes in spec.layout.values():
        for axis, entries in axes.items():
            for other_axis, others in axes.items():
                if other_axis != axis:
                    for n, _ in entries:
                        neighbours[n].update(o for o, _ in others)
            if any(part is not None and part.within for _, part in entries):  # a within part sees the others move
                names = {n for n, _ in entries}
                for n in names:
                    neighbours[n].update(names - {n})
    changes, changed_at, solved_at = 0, dict.fromkeys(spec.names, 0), dict.fromkeys(spec.names, -1)
    final: dict[str, tuple[object, int]] = {}  # group -> (kept similarity, `changes` when it was computed)
    potentials = {g: {} for g in spec.names} if potentials is None else potentials
    generator = torch.Generator().manual_seed(seed)
    bar = lambda items, desc: tqdm(items, desc=desc, leave=False, disable=not progress)  # noqa: E731
    if bottom_up_first:
        solved: set[str] = set()
        for group in bar(spec.names, "layer-by-layer pass"):
            s = similarity(group, perms, solved)
            perms[group] = solve_assignment(
                s, spec[group].blocks, previous=potentials.setdefault(group, {}), rigid=spec[group].rigid_runs
            )
            if neighbours[group] <= solved:  # every tensor of the group counted: its full objective
                final[group] = (keep(s, perms[group]), changes)
                if spec.coupling_of(group) is None:  # coupled: heads not yet moved
                    solved_at[group] = changes
            changes += 1
            changed_at[group] = changes
            solved.add(group)
    for sweep in range(max_iter):
        order = [spec.names[i] for i in torch.randperm(len(spec.names), generator=generator)]
        improved = False
        visited: set[str] = set()
        for group in bar(order, f"sweep {sweep + 1}"):
            unit = spec.coupling_of(group) or (group,)  # an attention layer's groups move their heads together
            if group in visited:
                continue
            visited.update(unit)
            if all(solved_at[n] >= 0 and all(changed_at[o] <= solved_at[n] for o in neighbours[n]) for n in unit):
                continue
            for n in unit:
                solved_at[n] = changes
            sims = [similarity(n, perms, None) for n in unit]
            new = (
                solve_coupled(sims, spec[group].blocks, [spec[n].rigid_runs for n in unit])
                if len(unit) > 1
                else [
                    solve_assignment(
                        sims[0],
                        spec[group].blocks,
                        previous=potentials.setdefault(group, {}),
                        rigid=spec[group].rigid_runs,
                    )
                ]
            )
            old_value = sum(matched_similarity(s, perms[n]) for s, n in zip(sims, unit))
            new_value = sum(matched_similarity(s, p) for s, p in zip(sims, new))
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                perms.update(zip(unit, new))
                improved = True
                changes += 1
                changed_at.update(dict.fromkeys(unit, changes))
            for n, s in zip(unit, sims):
                final[n] = (keep(s, perms[n]), solved_at[n])
        if not improved:
            break
    for g in spec.names:
        if g not in final or any(changed_at[o] > final[g][1] for o in neighbours[g]):
            final[g] = (keep(similarity(g, perms, None), perms[g]), changes)
    return perms, {g: final[g][0] for g in spec.names}


def solve_linear_matching(
    spec: PermutationSpec,
    pairs_a: TensorDict | Sequence[TensorDict],
    pairs_b: TensorDict | Sequence[TensorDict],
    max_iter: int = 100,
    seed: int = 0,
    bottom_up_first: bool = False,
    potentials: dict[str, dict] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Permutations pi of the b side maximising  sum_p sum_k <pairs_a[p][k], pi(pairs_b[p][k])>.

    pairs_a / pairs_b: one state-dict-like mapping each, or equal-length sequences of them paired
    element-wise. Only keys the spec names and both sides hold count. Sweeps visit the groups in a
    random order fixed by `seed` until a sweep improves no group, at most `max_iter` sweeps; a
    group's new permutation is kept only if it strictly improves its objective (ties keep the
    current one). Git Re-Basin starts the sweeps from the identity. With `bottom_up_first` they start
    from one layer-by-layer pass instead (paper App. D): groups in spec order, input to output, each
    using only the tensors whose other permuted axes belong to groups already matched. That start
    does not depend on how model_b's units happen to be labelled, so neither does the result.

    Returns (perms, similarities): similarities[g][i, j] is group g's objective for putting unit
    j of b in slot i, with every other group at its final permutation.

    Each group's columns are b's own units in every sweep, so a group solved again warm-starts from its last
    solve's column potentials (`solve_assignment`'s `previous`). `potentials`: group -> such a dict, given by
    a caller that matches slowly changing nets again and again (`align_to_average`); updated in place.
    The tensors are converted to float64 once and held; `alignment.streamed` reads them from disk instead.
    """
    if isinstance(pairs_a, Mapping):
        pairs_a, pairs_b = [pairs_a], [pairs_b]
    if len(pairs_a) != len(pairs_b):
        raise ValueError(f"pairs_a has {len(pairs_a)} mappings but pairs_b has {len(pairs_b)}")
    named = set(spec.layout)
    pairs = [
        (
            {k: a[k].detach().double() for k in named if k in a and k in b},
            {k: b[k].detach().double() for k in named if k in a and k in b},
        )
        for a, b in zip(pairs_a, pairs_b)
    ]
    similarity = lambda group, perms, solved: group_similarity(spec, group, pairs, perms, solved)  # noqa: E731
    return coordinate_descent(spec, similarity, max_iter, seed, bottom_up_first, potentials)


@dataclasses.dataclass
class WeightMatcher(Matcher):
    """Weight matching: maximise sum_k <theta_a[k], pi(theta_b)[k]>, no data needed.

    Every tensor the spec names counts (weights, biases, BatchNorm affine and running statistics).
    Git Re-Basin's coordinate descent (at most `max_iter` sweeps), started by default (`bottom_up=True`) from
    the paper's App. D pass: the first layer upward, each layer matched on its incoming weights, given the
    layers below; with `max_iter=0` that pass is the result, App. D exactly. `bottom_up=False` starts from the
    identity, as Git Re-Basin does: on nine 1-epoch MLP pairs (depth 2-3, width 128-512; REPRODUCING.md) it
    stopped at a lower objective every time (3-10% lower) and its midpoints were 2.2 points less accurate on
    average. "Upward" is the spec's group order: input to output for our models; a traced spec lists its
    groups in the graph's order.
    """

    name: ClassVar[str] = "weight"
    max_iter: int = 100
    seed: int = 0
    bottom_up: bool = True

    def __post_init__(self):
        if self.max_iter < 0:
            raise ValueError(f"max_iter={self.max_iter} must be >= 0")
        if self.max_iter == 0 and not self.bottom_up:
            raise ValueError(
                "max_iter=0 without bottom_up=True would return the identity; use bottom_up=True "
                "(App. D's one pass) or max_iter >= 1"
            )

    def match(
        self, model_a: nn.Module, model_b: nn.Module, data=None, *, potentials: dict[str, dict] | None = None
    ) -> Permutations:
        """`potentials`: warm starts kept between matches of slowly changing nets (see `solve_linear_matching`)."""
        spec = check_same_architecture(model_a, model_b)
        perms, similarities = solve_linear_matching(
            spec,
            model_a.state_dict(),
            model_b.state_dict(),
            self.max_iter,
            self.seed,
            bottom_up_first=self.bottom_up,
            potentials=potentials,
        )
        return Permutations(perms, self._info(similarities, perms, None))
