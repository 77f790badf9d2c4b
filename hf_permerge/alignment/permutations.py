"""`Permutations`: one LongTensor per permutation group, with apply / inverse / compose / save / load.

Convention (the spec's): unit j of the permuted net is unit `perms[g][j]` of the original,
i.e. permuting is `index_select` along every axis the group names. A matcher that aligns
model_b onto model_a returns the `Permutations` whose `apply(model_b)` lines up unit by unit
with model_a.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from collections.abc import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..io_utils import atomic_file
from .spec import PermutationSpec, apply_permutations

METADATA_KEY = "hf_permerge.permutations"
FORMAT_VERSION = 1


class Permutations(Mapping[str, torch.Tensor]):
    """An immutable map group -> LongTensor permutation, plus `info` (matcher, settings, data, similarities).

    It is a `Mapping`, so it can be handed to `apply_permutations` / `permute_tensor` as is.
    `info` is what reports store under `matching`: `{"matcher", "settings", "data",
    "groups": {group: {"similarity_identity", "similarity_matched"}}}`.
    """

    def __init__(self, perms: Mapping[str, torch.Tensor], info: dict | None = None):
        self._perms = {g: torch.as_tensor(p).detach().to(torch.long).cpu().contiguous() for g, p in perms.items()}
        for g, p in self._perms.items():
            if p.ndim != 1:
                raise ValueError(f"permutation of group {g!r} must be 1-D, got shape {tuple(p.shape)}")
        self.info = dict(info or {})

    # Mapping protocol ---------------------------------------------------------------------------
    def __getitem__(self, group: str) -> torch.Tensor:
        if group not in self._perms:
            raise KeyError(f"no permutation for group {group!r}; groups are {list(self._perms)}")
        return self._perms[group]

    def __iter__(self) -> Iterator[str]:
        return iter(self._perms)

    def __len__(self) -> int:
        return len(self._perms)

    def __eq__(self, other) -> bool:
        """A plain bool: the same groups carrying the same permutations (`info` is not compared). Anything that
        is not a map of groups to permutations, or differs in groups or sizes, is simply unequal."""
        return isinstance(other, Mapping) and not self.difference(other, limit=1)

    __hash__ = None

    def __repr__(self) -> str:
        shown = [f"{g}: {len(p)}" for g, p in itertools.islice(self._perms.items(), 6)]
        more = f", ... {len(self._perms) - 6} more" if len(self._perms) > 6 else ""
        return f"Permutations({{{', '.join(shown)}{more}}}, matcher={self.info.get('matcher')!r})"

    def difference(self, other: Mapping, limit: int = 10) -> list[str]:
        """Readable lines saying how `other` differs from these permutations (empty when equal), at most
        `limit`: groups on one side only, sizes, and the first slots holding other units."""
        lines = [f"group {g!r} only on the left" for g in self._perms if g not in other]
        lines += [f"group {g!r} only on the right" for g in other if g not in self._perms]
        for g, p in self._perms.items():
            if len(lines) >= limit or g not in other:
                continue
            try:
                q = torch.as_tensor(other[g]).detach().cpu().long().reshape(-1)
            except (TypeError, ValueError, RuntimeError) as e:
                lines.append(f"group {g!r}: the right side is not a permutation ({e})")
                continue
            if len(q) != len(p):
                lines.append(f"group {g!r}: {len(p)} units vs {len(q)}")
                continue
            slots = (p != q).nonzero().flatten().tolist()
            if slots:
                first = ", ".join(f"slot {j}: {int(p[j])} vs {int(q[j])}" for j in slots[:5])
                lines.append(
                    f"group {g!r}: {len(slots)} of {len(p)} slots differ ({first}{', ...' if len(slots) > 5 else ''})"
                )
        return lines[:limit]

    # Construction and checks --------------------------------------------------------------------
    @classmethod
    def identity(cls, spec: PermutationSpec) -> Permutations:
        return cls({g.name: torch.arange(g.size) for g in spec.groups}, {"matcher": "identity"})

    @classmethod
    def random(cls, spec: PermutationSpec, seed: int = 0) -> Permutations:
        """Uniformly random permutations (tests, and the 'random permutation' baseline)."""
        gen = torch.Generator().manual_seed(seed)
        block_maps = {}
        for coupled in spec.couplings:  # one map of whole blocks per coupling, shared by its groups
            block_maps.update(dict.fromkeys(coupled, torch.randperm(spec[coupled[0]].blocks, generator=gen)))

        def one(g):
            width = g.size // g.blocks  # whole blocks move as the coupling's map says; within, anything (not rigid)
            sigma = block_maps.get(g.name, torch.arange(g.blocks))
            run = width // g.runs  # a rigid group's runs move as wholes within their block, in order inside

            def within():
                if not g.rigid:
                    return torch.randperm(width, generator=gen)
                order = torch.randperm(g.runs, generator=gen) if g.runs > 1 else torch.zeros(1, dtype=torch.long)
                return (order[:, None] * run + torch.arange(run)).reshape(-1)

            return torch.cat([sigma[b] * width + within() for b in range(g.blocks)])

        return cls({g.name: one(g) for g in spec.groups}, {"matcher": "random", "settings": {"seed": seed}})

    def validate(self, spec: PermutationSpec) -> None:
        """Raise ValueError unless there is exactly one bijection of the right size per spec group."""
        missing = [g for g in spec.names if g not in self._perms]
        extra = [g for g in self._perms if g not in spec.names]
        if missing or extra:
            raise ValueError(
                f"permutations do not fit the model: missing groups {missing}, unknown groups {extra} "
                f"(the model's groups are {spec.names}); were they found for another architecture?"
            )
        for g in spec.groups:
            p = self._perms[g.name]
            if len(p) != g.size:
                raise ValueError(
                    f"permutation of group {g.name!r} has {len(p)} entries but the group has "
                    f"{g.size} units; were they found for a model of another width?"
                )
            if not torch.equal(torch.sort(p).values, torch.arange(g.size)):
                values, counts = torch.unique(p, return_counts=True)
                raise ValueError(
                    f"permutation of group {g.name!r} is not a bijection of 0..{g.size - 1}: "
                    f"repeated entries {values[counts > 1].tolist()[:5]}, "
                    f"out-of-range entries {p[(p < 0) | (p >= g.size)].tolist()[:5]}"
                )
        maps = {}
        for g in spec.groups:
            run = g.size // g.blocks // g.runs
            if g.rigid and not (self._perms[g.name].view(-1, run) % run == torch.arange(run)).all():
                raise ValueError(
                    f"permutation of group {g.name!r} reorders units within its blocks, which must keep their "
                    "order (a rotary embedding pairs each head's units by position)"
                )
            if g.blocks == 1:
                continue
            width = g.size // g.blocks
            source = self._perms[g.name].view(g.blocks, width) // width
            coupled = spec.coupling_of(g.name)
            if not (source == source[:, :1]).all() or (
                coupled is None and not torch.equal(source[:, 0], torch.arange(g.blocks))
            ):
                raise ValueError(
                    f"permutation of group {g.name!r} moves units between its {g.blocks} blocks "
                    "(attention heads), which would change the model's function"
                )
            if coupled is not None and not torch.equal(maps.setdefault(coupled, source[:, 0]), source[:, 0]):
                raise ValueError(f"groups {coupled} must move their blocks (heads) alike; {g.name!r} does not")

    def is_identity(self) -> bool:
        return all(torch.equal(p, torch.arange(len(p))) for p in self._perms.values())

    # Algebra ------------------------------------------------------------------------------------
    def inverse(self) -> Permutations:
        """The permutations that undo these: `p.inverse().apply(p.apply(x)) == x`."""
        return Permutations({g: torch.argsort(p) for g, p in self._perms.items()}, {"derived": "inverse"})

    def compose(self, other: Permutations) -> Permutations:
        """`self` after `other`, like f∘g: `p.compose(q).apply(x) == p.apply(q.apply(x))`.

        With unit j of `q.apply(x)` being unit q[j] of x, unit j of `p.apply(q.apply(x))` is
        unit q[p[j]] of x, so the composite is `q[p]` per group.
        """
        if set(self) != set(other):
            raise ValueError(f"cannot compose permutations of different groups: {sorted(self)} vs {sorted(other)}")
        for g in self:
            if len(self[g]) != len(other[g]):
                raise ValueError(f"cannot compose group {g!r}: sizes {len(self[g])} and {len(other[g])} differ")
        return Permutations({g: other[g][self[g]] for g in self}, {"derived": "compose"})

    # Use ----------------------------------------------------------------------------------------
    def apply(self, model_or_state_dict, spec: PermutationSpec | None = None):
        """A permuted copy: a new model of the same class (same device, dtype, mode), or a new state dict.

        The spec defaults to `model.permutation_spec()`; a state dict needs it passed in.
        The input is never modified.
        """
        if isinstance(model_or_state_dict, nn.Module):
            model = model_or_state_dict
            spec = spec or model.permutation_spec()
            state = model.state_dict()
            spec.validate(state)
            self.validate(spec)
            out = copy.deepcopy(model)
            out.load_state_dict(apply_permutations(spec, state, self))
            return out
        if spec is None:
            raise ValueError(
                "applying permutations to a state dict needs the model's PermutationSpec: "
                "pass spec=model.permutation_spec()"
            )
        spec.validate(model_or_state_dict)
        self.validate(spec)
        return apply_permutations(spec, model_or_state_dict, self)

    # Files --------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (one int64 tensor per group) whose metadata header holds `info` as JSON."""
        path = os.fspath(path)
        header = {**self.info, "format_version": FORMAT_VERSION, "group_order": list(self._perms)}
        metadata = {METADATA_KEY: json.dumps(header, sort_keys=True, default=_json_default)}
        with atomic_file(path) as tmp:
            save_file(dict(self._perms), str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Permutations:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no permutations file at {path!r}")
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                perms = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path!r} is not a readable safetensors permutations file: {e}") from e
        if METADATA_KEY not in metadata:
            raise ValueError(
                f"{path!r} is a safetensors file but not a permutations file (its metadata lacks {METADATA_KEY!r})"
            )
        header = json.loads(metadata[METADATA_KEY])
        order = header.pop("group_order", list(perms))
        header.pop("format_version", None)
        return cls({g: perms[g] for g in order}, header)


def _json_default(x):
    """Settings may hold tensors or numpy scalars; store them as plain JSON numbers/lists."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)
