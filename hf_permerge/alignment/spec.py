"""The permutation spec: which tensor axes each group of hidden units permutes.

Everything downstream (apply, invert, match, merge) is written once against this
spec, never per architecture (Git Re-Basin's idea, with a validator on top).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class AxisPart:
    """Where a group's units sit on an axis it shares with other groups (a fused projection's part).

    Unit u sits at position  start + (u // width) * stride + u % width  (runs of `width` consecutive units, one per
    head, `stride` apart): GPT-2's c_attn keys are `AxisPart(d, d)`; GPT-NeoX's per-head interleaved [q k v] rows
    put head h's keys at `AxisPart(hd, hd, 3 * hd)`. With `reps` > 1 the unit also sits at that position plus
    r * rep_stride for r < reps, all moved alike: one value head read by several query heads (grouped-query and
    multi-query attention) is repeated on the output projection's inputs."""

    start: int
    width: int
    stride: int = 0
    reps: int = 1
    rep_stride: int = 0
    within: bool = False
    """Only the part of the group's permutation inside its blocks acts here, before the axis's other groups: one
    key/value head's value units, permuted alike on the output-projection inputs of every query head that reads it,
    while the query-head group moves those inputs by whole heads."""

    def __post_init__(self):
        if self.start < 0 or self.width < 1 or self.reps < 1 or (self.reps > 1 and self.rep_stride < 1):
            raise ValueError(f"{self} is not a part of an axis (start >= 0, width >= 1, reps >= 1)")

    def positions(self, size: int) -> torch.Tensor:
        """(size, reps): the axis positions of each of `size` units."""
        u = torch.arange(size)
        first = self.start + (u // self.width) * self.stride + u % self.width
        return first[:, None] + torch.arange(self.reps) * self.rep_stride

    def __str__(self) -> str:
        rep = f", x{self.reps} every {self.rep_stride}" if self.reps > 1 else ""
        rep += ", within blocks" if self.within else ""
        if self.stride:
            return f"[{self.start}: {self.width} every {self.stride}{rep}]"
        return f"[{self.start}:{self.start + self.width}{rep}]"


@dataclass(frozen=True)
class PermGroup:
    """One permutation group: the units of a hidden layer or the channels of a conv layer."""

    name: str
    size: int
    axes: tuple[tuple[str, int], ...]
    """(state-dict key, axis) pairs this group permutes (weights, biases, norm buffers)."""
    activation: str | None
    """Module whose output carries the group's post-nonlinearity activations (units on `unit_axis`);
    None where no module carries them alone (a functional activation): weight matching still works."""
    preactivation: str | None = None
    """Module whose output carries the pre-nonlinearity activations (units on `unit_axis`)."""
    unit_axis: int = 1
    """Axis of those modules' outputs that carries the units: 1 for (N, units) and conv maps (N, C, H, W),
    2 for a transformer's (N, tokens, units). Every other position counts as a sample of its unit."""
    blocks: int = 1
    """The units form `blocks` equal runs of consecutive units (the heads of an attention layer) that a
    permutation keeps whole: each block's units are permuted among themselves, and whole blocks move only
    together with the other groups of a `PermutationSpec.couplings` entry (else they stay in place)."""
    rigid: bool = False
    """Each block keeps its units in order: only whole blocks move, through a coupling (a rotary embedding pairs
    the units within each head by position, but treats every head alike). Matching gives such a group the identity
    within each block."""
    runs: int = 1
    """A rigid group's blocks hold `runs` equal runs of units (the query heads sharing one key/value head) that move
    as wholes within their block, each keeping its order: the query heads of a grouped-query block permute among
    themselves. 1: the block keeps its order."""
    parts: tuple[tuple[str, int, AxisPart], ...] = ()
    """(state-dict key, axis, part) triples: the group permutes only that part of the axis, other groups the rest
    (the q | k | v parts of a fused projection). A group may hold two parts of one axis (GPT-2's queries and keys
    share one group)."""
    activation_part: AxisPart | None = None
    """The part of the activation module's unit axis that carries this group (a fused projection's output)."""

    def __post_init__(self):
        if self.blocks < 1 or self.size % self.blocks:
            raise ValueError(
                f"permutation group {self.name!r}: {self.size} units do not split into {self.blocks} equal blocks"
            )
        if self.runs < 1 or (self.size // self.blocks) % self.runs or (self.runs > 1 and not self.rigid):
            raise ValueError(
                f"permutation group {self.name!r}: runs={self.runs} must divide its {self.size // self.blocks} units "
                "per block, and runs > 1 needs a rigid group"
            )
        if self.rigid and self.blocks < 2 and self.runs < 2:
            raise ValueError(f"permutation group {self.name!r} is rigid but has no blocks or runs to move")

    @property
    def rigid_runs(self) -> int:
        """What the solvers take as `rigid`: 0 (units move freely within blocks), or the number of rigid runs per
        block that may permute among themselves (1: the block keeps its order)."""
        return self.runs if self.rigid else 0


@dataclass(frozen=True)
class PermutationSpec:
    groups: tuple[PermGroup, ...]
    couplings: tuple[tuple[str, ...], ...] = ()
    """Sets of blocked groups whose blocks move together (one attention layer: its query/key units and its
    value/output units; permuting whole heads must move both alike)."""

    def __post_init__(self):
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"permutation spec has duplicate group names: {names}")
        by_name = {g.name: g for g in self.groups}
        for coupled in self.couplings:
            unknown = [n for n in coupled if n not in by_name]
            if unknown or len({by_name[n].blocks for n in coupled}) != 1 or by_name[coupled[0]].blocks < 2:
                raise ValueError(
                    f"coupling {coupled} must name groups of the spec with the same number (> 1) of blocks"
                )

    @cached_property
    def layout(self) -> dict[str, dict[int, list[tuple[str, AxisPart | None]]]]:
        """key -> {axis: [(group, part or None for the whole axis), ...]}: the inverse map, derived once, never
        written by hand. The single source every permuting and matching function reads."""
        out: dict[str, dict[int, list]] = {}
        for g in self.groups:
            for key, axis in g.axes:
                out.setdefault(key, {}).setdefault(axis, []).append((g.name, None))
            for key, axis, part in g.parts:
                out.setdefault(key, {}).setdefault(axis, []).append((g.name, part))
        return out

    def groups_on(self, key: str) -> set[str]:
        """Every group that permutes some axis of `key`."""
        return {n for entries in self.layout.get(key, {}).values() for n, _ in entries}

    def coupling_of(self, name: str) -> tuple[str, ...] | None:
        return next((c for c in self.couplings if name in c), None)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    @cached_property
    def by_name(self) -> dict[str, PermGroup]:
        return {g.name: g for g in self.groups}

    def __getitem__(self, name: str) -> PermGroup:
        if name not in self.by_name:
            raise KeyError(f"no permutation group {name!r}; groups are {self.names}")
        return self.by_name[name]

    def equivalent(self, other: PermutationSpec) -> bool:
        """True when both specs permute the same tensors alike: the same groups up to their names and order.

        Groups correspond when they name the same (key, axis) pairs and parts; corresponding groups must have the same
        size, blocks and rigidity, and the couplings must correspond. Where matching reads a group's activations
        (`activation`, `preactivation`, `unit_axis`) is not compared: two specs may hook different modules
        that carry the same units. Use it to compare a traced spec with a hand-written one (their group
        names differ); `==` also compares names and hooks.
        """
        if not isinstance(other, PermutationSpec) or len(self.groups) != len(other.groups):
            return False
        theirs = {frozenset(g.axes) | frozenset(g.parts): g for g in other.groups}
        renamed: dict[str, str] = {}
        for g in self.groups:
            h = theirs.get(frozenset(g.axes) | frozenset(g.parts))
            if h is None or (h.size, h.blocks, h.rigid, h.runs) != (g.size, g.blocks, g.rigid, g.runs):
                return False
            renamed[g.name] = h.name
        if len(set(renamed.values())) != len(other.groups):
            return False
        return {frozenset(renamed[n] for n in c) for c in self.couplings} == {frozenset(c) for c in other.couplings}

    def axes_to_perm(self) -> dict[str, dict[int, str]]:
        """key -> {axis: group} for the axes a group permutes whole (`layout` has the parts too); every key the
        spec names is a key of the result, one whose axes are all shared by parts with an empty map."""
        out: dict[str, dict[int, str]] = {key: {} for key in self.layout}
        for key, axes in self.layout.items():
            for axis, entries in axes.items():
                if entries[0][1] is None:
                    out[key][axis] = entries[0][0]
        return out

    def validate(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Check that the spec fits a state dict: keys exist, sizes agree, no axis named twice. A group may act on
        two axes of one tensor (P W P^T: BERT's MLM transform, a layer whose input and output are one stream)."""
        for key, axes in self.layout.items():
            if key not in state_dict:
                raise ValueError(
                    f"permutation group {axes[min(axes)][0][0]!r} names {key!r}, which is not in the state dict"
                )
            t = state_dict[key]
            for axis, entries in axes.items():
                names = [n for n, _ in entries]
                if axis >= t.ndim:
                    raise ValueError(
                        f"permutation group {names[0]!r} names axis {axis} of {key!r} with shape {tuple(t.shape)}"
                    )
                if any(part is None for _, part in entries):
                    if len([e for e in entries if e[1] is None or not e[1].within]) > 1:
                        raise ValueError(f"permutation groups {names} all name axis {axis} of {key!r} whole")
                    whole = next(n for n, part in entries if part is None)
                    if t.shape[axis] != self[whole].size:
                        raise ValueError(
                            f"permutation group {whole!r} (size {self[whole].size}) does not fit axis {axis} "
                            f"of {key!r} with shape {tuple(t.shape)}"
                        )
                taken = torch.zeros(t.shape[axis], dtype=torch.bool)
                for name, part in entries:
                    if part is None:
                        continue
                    pos = part.positions(self[name].size).flatten()
                    if part.within and int(pos.max()) < t.shape[axis] and len(pos.unique()) == len(pos):
                        continue  # it reorders units inside positions the axis's other groups move whole
                    if int(pos.max()) >= t.shape[axis] or taken[pos].any() or len(pos.unique()) != len(pos):
                        raise ValueError(
                            f"permutation group {name!r} (size {self[name].size}) part {part} does not fit axis "
                            f"{axis} of {key!r} with shape {tuple(t.shape)} beside the other parts there"
                        )
                    taken[pos] = True


def axis_index(
    size: int, entries, perms: Mapping[str, torch.Tensor], groups: Mapping[str, PermGroup], skip=lambda g, part: False
) -> torch.Tensor | None:
    """The gather index of one axis of `size` positions under its groups' permutations (None: nothing moves).
    Position P(j) takes what stood at P(perm[j]), for each part P of the axis; a whole-axis group is its own index.
    A `within` part acts first, on the positions as they are: each unit moves inside its own block to where the
    group's permutation puts it relative to that block. `skip(group, part)`: entries left out."""
    index, within = None, None
    for group, part in entries:
        if skip(group, part) or group not in perms:
            continue
        perm, g = perms[group].cpu(), groups[group]
        if part is not None and part.within:
            width = g.size // g.blocks
            units = torch.arange(g.size)
            moved = torch.empty_like(perm)
            moved[(perm // width) * width + units % width] = perm  # source unit -> its unit after the move, in place
            pos = part.positions(g.size)
            within = torch.arange(size) if within is None else within
            within[pos] = pos[moved]
        elif part is None:
            index = perm
        else:
            index = torch.arange(size) if index is None else index
            pos = part.positions(g.size)
            index[pos] = pos[perm]
    if within is None:
        return index
    return within if index is None else within[index]


def _permute_axes(
    spec: PermutationSpec, key: str, tensor: torch.Tensor, perms, except_group=None, except_axis=None, axis_group=None
):
    """The single place a tensor is permuted: every axis whose groups have a permutation (but `except_group`); on
    `except_axis` only the `within` parts of groups other than `axis_group` (weight matching's view of one axis)."""
    for axis, entries in spec.layout.get(key, {}).items():
        if axis == except_axis:
            skip = lambda g, part: part is None or not part.within or g == axis_group  # noqa: E731
        else:
            skip = lambda g, part: g == except_group  # noqa: E731
        index = axis_index(tensor.shape[axis], entries, perms, spec.by_name, skip)
        if index is not None:
            tensor = torch.index_select(tensor, axis, index.to(tensor.device))
    return tensor


def permute_tensor(
    spec: PermutationSpec,
    key: str,
    tensor: torch.Tensor,
    perms: Mapping[str, torch.Tensor],
    except_group: str | None = None,
    except_axis: int | None = None,
    axis_group: str | None = None,
) -> torch.Tensor:
    """Apply every group's permutation that acts on `key` (optionally all but one group, or all but one axis: there,
    only the `within` parts of groups other than `axis_group`)."""
    return _permute_axes(spec, key, tensor, perms, except_group, except_axis, axis_group)


def apply_permutations(
    spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return a permuted copy of a state dict: unit j of the result is unit perms[g][j] of the input."""
    return {key: _permute_axes(spec, key, t, perms) for key, t in state_dict.items()}
