"""Symmetries beyond permutations as values: per group a permutation, then signs or an orthogonal map, applied to
a state dict through the spec's layout; and the fold of norm gains into the layers that read a norm.

Convention (the spec's, extended): unit j of the result is  sum_i M[j, i] * unit i  of the input on every axis the
group names, with M = Q S P (P the permutation, S the signs, Q the matrix). For an orthogonal M that one rule is
right for writers (h -> M h) and readers alike (W -> W M^T = W M^-1), as it is for permutations. Tensors that hold
one scale per unit (a norm's weight) and a gated MLP's gate rows are `plain`: they take the permutation only. A map
that is not orthogonal (per attention head: values by B and the output projection's inputs by B^-T; queries by A,
keys by A^-T) names its `dual` tensors, which take M^-T.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..io_utils import atomic_file
from .spec import PermutationSpec, permute_tensor

METADATA_KEY = "hf_permerge.transforms"
KINDS = ("perms", "signs", "matrices", "duals")


@dataclass(frozen=True)
class Fold:
    """A norm's gain (weight) folded into the layers that read its output: each reader's input axis is scaled by
    it and the gain becomes 1. The function is unchanged; the checkpoint keeps its architecture."""

    norm: str
    """State-dict key of the norm's weight."""
    readers: tuple[tuple[str, int], ...]
    """(key, axis): the reader weights and the axis that carries the norm's units."""
    bias: str | None = None
    """State-dict key of a LayerNorm's bias: it goes into each reader's bias (W b + c) and becomes 0."""


def fold_state(state: Mapping[str, torch.Tensor], folds: tuple[Fold, ...]) -> dict[str, torch.Tensor]:
    """A copy of `state` with every fold done (idempotent: a folded gain is 1, a folded bias 0)."""
    out = dict(state)
    for f in folds:
        gain, shift = out[f.norm], out[f.bias] if f.bias else None
        for key, axis in f.readers:
            w = out[key]
            reader_bias = f"{key.rsplit('.', 1)[0]}.bias"
            if shift is not None and reader_bias in out:
                out[reader_bias] = out[reader_bias] + torch.tensordot(w, shift.to(w.dtype), dims=([axis], [0]))
            out[key] = along(w, axis, gain)
        out[f.norm] = torch.ones_like(gain)
        if shift is not None:
            out[f.bias] = torch.zeros_like(shift)
    return out


def along(t: torch.Tensor, axis: int, vector: torch.Tensor) -> torch.Tensor:
    """`t` scaled by `vector` along `axis`."""
    shape = [1] * t.ndim
    shape[axis] = -1
    return t * vector.to(t.dtype).reshape(shape)


def matrix_along(t: torch.Tensor, axis: int, matrix: torch.Tensor, part=None) -> torch.Tensor:
    """result[..., j, ...] = sum_i matrix[j, i] * t[..., i, ...] on `axis` (on the positions of `part` only)."""
    if part is None:
        return torch.tensordot(matrix.to(t.dtype), t, dims=([1], [axis])).movedim(0, axis)
    for pos in part.positions(len(matrix)).T:  # each repeat of the part (a key/value head read by several queries)
        t = t.index_copy(axis, pos, matrix_along(t.index_select(axis, pos), axis, matrix))
    return t


def side(key: str, axis: int, part) -> tuple:
    """How `Transforms.dual` names one tensor axis (or one part of it) of a group."""
    return (key, axis, None if part is None else part.start)


@dataclass(frozen=True)
class Transforms:
    """One class element per group: `perms` (every group), `signs` (+-1 per unit) and `matrices` (orthogonal) where
    found, the `plain` (key, axis) pairs of a group that take its permutation only, the `dual` sides (`side`) that
    take M^-T (`duals` holds it), and the `folds` done on both nets first. `apply(model_b)` computes model_b's function, lined up with `reference(model_a)`."""

    perms: dict[str, torch.Tensor]
    signs: dict[str, torch.Tensor] = field(default_factory=dict)
    matrices: dict[str, torch.Tensor] = field(default_factory=dict)
    plain: dict[str, frozenset] = field(default_factory=dict)
    dual: dict[str, frozenset] = field(default_factory=dict)
    duals: dict[str, torch.Tensor] = field(default_factory=dict)
    fixes_ones: frozenset = frozenset()
    """Groups whose matrix must map the all-ones vector to itself (a LayerNorm stream)."""
    folds: tuple[Fold, ...] = ()
    info: dict = field(default_factory=dict)

    def tensor(
        self,
        spec: PermutationSpec,
        key: str,
        t: torch.Tensor,
        except_axis: int | None = None,
        axis_group: str | None = None,
        except_group: str | None = None,
    ):
        """One tensor transformed on every axis its groups name; folds are not done here. Matching's views: but
        `except_axis` (there only the permutations of other groups' `within` parts, as `permute_tensor` does with
        `axis_group`), or every group but `except_group`."""
        t = permute_tensor(spec, key, t, self.perms, except_group, except_axis, axis_group)
        for axis, entries in spec.layout.get(key, {}).items():
            if axis == except_axis:
                continue
            for group, part in entries:
                if group == except_group:
                    continue
                if (key, axis) in self.plain.get(group, ()):
                    continue
                s, q = self.signs.get(group), self.matrices.get(group)
                if s is not None:
                    if part is not None:
                        full = torch.ones(t.shape[axis], dtype=s.dtype)
                        full[part.positions(len(s))] = s[:, None]
                        s = full
                    t = along(t, axis, s)
                if q is not None:
                    if side(key, axis, part) in self.dual.get(group, ()):
                        q = self.duals[group]
                    t = matrix_along(t, axis, q, part)
        return t

    def apply_state(self, spec: PermutationSpec, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """model_b's state dict folded, then transformed: the same function, lined up with the reference."""
        folded = fold_state(state, self.folds)
        return {k: self.tensor(spec, k, t) for k, t in folded.items()}

    def apply(self, model: nn.Module, spec: PermutationSpec | None = None) -> nn.Module:
        """A transformed copy of `model` (same class, device, dtype); the input is not modified."""
        spec = spec or model.permutation_spec()
        out = copy.deepcopy(model)
        out.load_state_dict(self.apply_state(spec, model.state_dict()))
        return out

    def reference(self, model: nn.Module) -> nn.Module:
        """model_a as the merge sees it: its norm gains folded (the same function; a copy when there are folds)."""
        if not self.folds:
            return model
        out = copy.deepcopy(model)
        out.load_state_dict(fold_state(model.state_dict(), self.folds))
        return out


def save_transforms(t: Transforms, path: str | os.PathLike) -> None:
    """One safetensors file: the tensors as '<kind>/<group>', the rest (plain and dual sides, folds, info) as JSON
    in its metadata header."""
    tensors = {f"{kind}/{g}": v.contiguous() for kind in KINDS for g, v in getattr(t, kind).items()}
    header = {
        "plain": {g: sorted(map(list, v)) for g, v in t.plain.items()},
        "dual": {g: sorted(map(list, v), key=str) for g, v in t.dual.items()},
        "fixes_ones": sorted(t.fixes_ones),
        "folds": [{"norm": f.norm, "readers": [list(r) for r in f.readers], "bias": f.bias} for f in t.folds],
        "info": t.info,
    }
    with atomic_file(os.fspath(path)) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})


def load_transforms(path: str | os.PathLike) -> Transforms:
    """What `save_transforms` wrote; a ValueError naming the file for anything else."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for missing or corrupt files
        raise ValueError(f"{path!r} is not a readable safetensors transforms file: {e}") from e
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path!r} is a safetensors file but not a transforms file (no {METADATA_KEY!r} metadata)")
    h = json.loads(metadata[METADATA_KEY])
    fields = {kind: {} for kind in KINDS}
    for name, v in tensors.items():
        kind, group = name.split("/", 1)
        fields[kind][group] = v
    return Transforms(
        **fields,
        plain={g: frozenset(tuple(x) for x in v) for g, v in h["plain"].items()},
        dual={g: frozenset(tuple(x) for x in v) for g, v in h["dual"].items()},
        fixes_ones=frozenset(h["fixes_ones"]),
        folds=tuple(Fold(f["norm"], tuple(tuple(r) for r in f["readers"]), f["bias"]) for f in h["folds"]),
        info=h["info"],
    )


def merge_aligned(model_a: nn.Module, model_b: nn.Module, transforms: Transforms, weight: float = 0.5) -> nn.Module:
    """(1 - weight) * reference(model_a) + weight * transforms.apply(model_b): an ordinary checkpoint of model_a's
    class (norm gains folded to 1 where `transforms.folds` says so)."""
    return merge_all([model_a, model_b], [transforms], [1 - weight, weight])


def merge_all(models: list[nn.Module], transforms: list[Transforms], weights: list[float] | None = None) -> nn.Module:
    """The weighted average (default: uniform) of models[0], folded, and each models[i] under transforms[i - 1]
    (each found aligning models[i] onto models[0]): the n-way merge, an ordinary checkpoint of models[0]'s class."""
    if len(transforms) != len(models) - 1:
        raise ValueError(f"need one Transforms per model after the first: {len(models)} models, {len(transforms)}")
    folds = {t.folds for t in transforms}
    if len(folds) > 1:
        raise ValueError("the transforms fold different norms: were they found with different symmetry settings?")
    weights = weights or [1 / len(models)] * len(models)
    spec = models[0].permutation_spec()
    states = [fold_state(models[0].state_dict(), transforms[0].folds if transforms else ())]
    states += [t.apply_state(spec, m.state_dict()) for m, t in zip(models[1:], transforms)]
    merged = {
        k: sum(w * s[k].float() for w, s in zip(weights, states)).to(t.dtype) if t.is_floating_point() else t
        for k, t in states[0].items()
    }
    out = copy.deepcopy(models[0])
    out.load_state_dict(merged)
    return out
