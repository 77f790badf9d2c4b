"""The permutation spec: which tensor axes each group of hidden units permutes.

Everything downstream (apply, invert, match, merge) is written once against this
spec, never per architecture (Git Re-Basin's idea, with a validator on top).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


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

    def __post_init__(self):
        if self.blocks < 1 or self.size % self.blocks:
            raise ValueError(
                f"permutation group {self.name!r}: {self.size} units do not split into {self.blocks} equal blocks"
            )
        if self.rigid and self.blocks < 2:
            raise ValueError(f"permutation group {self.name!r} is rigid but has no blocks to move (blocks < 2)")


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

    def coupling_of(self, name: str) -> tuple[str, ...] | None:
        return next((c for c in self.couplings if name in c), None)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def __getitem__(self, name: str) -> PermGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no permutation group {name!r}; groups are {self.names}")

    def equivalent(self, other: PermutationSpec) -> bool:
        """True when both specs permute the same tensors alike: the same groups up to their names and order.

        Groups correspond when they name the same (key, axis) pairs; corresponding groups must have the same
        size, blocks and rigidity, and the couplings must correspond. Where matching reads a group's activations
        (`activation`, `preactivation`, `unit_axis`) is not compared: two specs may hook different modules
        that carry the same units. Use it to compare a traced spec with a hand-written one (their group
        names differ); `==` also compares names and hooks.
        """
        if not isinstance(other, PermutationSpec) or len(self.groups) != len(other.groups):
            return False
        theirs = {frozenset(g.axes): g for g in other.groups}
        renamed: dict[str, str] = {}
        for g in self.groups:
            h = theirs.get(frozenset(g.axes))
            if h is None or (h.size, h.blocks, h.rigid) != (g.size, g.blocks, g.rigid):
                return False
            renamed[g.name] = h.name
        if len(set(renamed.values())) != len(other.groups):
            return False
        return {frozenset(renamed[n] for n in c) for c in self.couplings} == {frozenset(c) for c in other.couplings}

    def axes_to_perm(self) -> dict[str, dict[int, str]]:
        """key -> {axis: group}: the inverse map, derived, never written by hand."""
        out: dict[str, dict[int, str]] = {}
        for g in self.groups:
            for key, axis in g.axes:
                out.setdefault(key, {})[axis] = g.name
        return out

    def validate(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Check that the spec fits a state dict: keys exist, sizes agree, no axis named twice. A group may act on
        two axes of one tensor (P W P^T: BERT's MLM transform, a layer whose input and output are one stream)."""
        seen: dict[str, set[str]] = {}
        for g in self.groups:
            for key, axis in g.axes:
                if key not in state_dict:
                    raise ValueError(f"permutation group {g.name!r} names {key!r}, which is not in the state dict")
                t = state_dict[key]
                if axis >= t.ndim or t.shape[axis] != g.size:
                    raise ValueError(
                        f"permutation group {g.name!r} (size {g.size}) does not fit axis {axis} of {key!r} "
                        f"with shape {tuple(t.shape)}"
                    )
                if (g.name, axis) in seen.setdefault(key, set()):
                    raise ValueError(f"permutation group {g.name!r} names axis {axis} of {key!r} twice")
                seen[key].add((g.name, axis))


def _permute_axes(
    tensor: torch.Tensor, axes: Mapping[int, str], perms: Mapping[str, torch.Tensor], except_group: str | None = None
) -> torch.Tensor:
    """The single place a tensor is permuted: every axis whose group has a permutation (but `except_group`)."""
    for axis, group in axes.items():
        if group != except_group and group in perms:
            tensor = torch.index_select(tensor, axis, perms[group].to(tensor.device))
    return tensor


def permute_tensor(
    spec: PermutationSpec,
    key: str,
    tensor: torch.Tensor,
    perms: Mapping[str, torch.Tensor],
    except_group: str | None = None,
    except_axis: int | None = None,
) -> torch.Tensor:
    """Apply every group's permutation that acts on `key` (optionally all but one group, or all but one axis)."""
    axes = {a: g for a, g in spec.axes_to_perm().get(key, {}).items() if a != except_axis}
    return _permute_axes(tensor, axes, perms, except_group)


def apply_permutations(
    spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return a permuted copy of a state dict: unit j of the result is unit perms[g][j] of the input."""
    a2p = spec.axes_to_perm()
    return {key: _permute_axes(t, a2p.get(key, {}), perms) for key, t in state_dict.items()}
