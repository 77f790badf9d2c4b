"""Matching beyond permutations (Theus et al. 2025): signed permutations, orthogonal maps of the residual stream,
and (`per_head`) invertible maps per attention head.

- "signed": RMSNorm is odd per coordinate (rms(Sx) = rms(x)), so a stream coordinate's sign flipped in every writer
  and reader, the norm gains kept, leaves the function unchanged; so does a SwiGLU up unit's sign (up row and
  down column: silu(gate) * up is odd in up). A group's objective with signs is  sum_i C_plain[i, p(i)] +
  s_i C_free[i, p(i)],  maximised by s_i = sign(C_free[i, p(i)]): the permutation solves on C_plain + |C_free|.
- "orthogonal": once every norm gain is folded into the layers that read it (`folding`), rms(Qx) = rms(x) for any
  orthogonal Q, so an RMSNorm stream admits Q; a LayerNorm stream (its bias folded into the readers' biases too)
  admits the Q with Q1 = 1, which commute with its mean-centering. Found by Procrustes (Q = U V^T of
  sum_k A_k B_k^T, restricted to the complement of the ones for LayerNorm) on weights, or on the cross-covariance
  of the norms' outputs. Refused, naming the norm, where a fold cannot be done (a tie, a missing reader bias, a
  post-LN residual).
- `head_maps` ("values", "all"): invertible maps per attention head, see `per_head`; they combine with either.

Signs under LayerNorm are refused: its mean-centering mixes coordinates, so LN(Sx) != S LN(x) for a per-coordinate
flip S (only S = -I holds, with its bias flipped too). Every other group keeps permutations. Which tensors of a
group take a sign is found by trying (a flip of one random element must keep the function), never by names.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..matching import SymmetrySettings
from . import per_head
from .base import Matcher, check_matching_data, check_same_architecture
from .beyond_statistics import head_moments, signed_from_activations, stream_cross
from .folding import FunctionCheck, find_folds, is_layer_norm, is_rms, norms_on, owner, stream_groups
from .hungarian import matched_similarity, solve_assignment, solve_coupled
from .spec import PermutationSpec
from .transforms import Transforms, fold_state
from .weight import add_within


def check_admitted(model: nn.Module, spec: PermutationSpec, symmetry: str) -> list[str]:
    """The stream groups, or a ValueError in one line naming the module that forbids `symmetry`."""
    streams = stream_groups(model, spec)
    if not streams:
        raise ValueError(f"symmetry {symmetry!r}: {type(model).__name__} has no residual stream through a norm")
    for group in streams:
        for name, module in norms_on(model, spec, group).items():
            if is_rms(module) or (symmetry == "orthogonal" and is_layer_norm(module)):
                continue
            why = (
                "its mean-centering mixes coordinates, so a per-coordinate sign flip is no symmetry (only "
                "flipping every coordinate and its bias is)"
                if is_layer_norm(module)
                else "no orthogonal map or sign flip is known to commute with it"
            )
            raise ValueError(
                f"symmetry {symmetry!r} is refused: the residual stream passes {name} "
                f"({type(module).__name__}): {why}; use the weight or activation matcher (permutations)"
            )
    return streams


def random_orthogonal(n: int, gen: torch.Generator, fix_ones: bool = False) -> torch.Tensor:
    """Haar-random orthogonal (n, n); `fix_ones`: one that maps the all-ones vector to itself."""
    if fix_ones:
        u = ones_complement(n)
        return torch.full((n, n), 1.0 / n, dtype=torch.float64) + u @ random_orthogonal(n - 1, gen) @ u.T
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def ones_complement(n: int) -> torch.Tensor:
    """(n, n - 1): an orthonormal basis of the vectors orthogonal to the all-ones vector."""
    basis = torch.linalg.qr(torch.cat([torch.ones(n, 1, dtype=torch.float64), torch.eye(n, dtype=torch.float64)], 1))
    return basis[0][:, 1:n]


def plan(model: nn.Module, spec: PermutationSpec, symmetry: str, head_maps: str = "none", seed: int = 0):
    """The identity element of the class (`symmetry` on the stream, `head_maps` on the heads) for this model: which
    groups take signs or a matrix, which of their tensors stay plain or take M^-T, and the folds; each choice tried
    once on the model (refused, in one line, where it fails)."""
    gen = torch.Generator().manual_seed(seed)
    identity = {g.name: torch.arange(g.size) for g in spec.groups}
    tr = Transforms(identity) if symmetry == "permutation" else stream_plan(model, spec, symmetry, gen, identity)
    if head_maps == "none":
        return tr
    groups = per_head.plan_heads(model, spec, head_maps, gen)
    heads = per_head.element(spec, groups, {g: torch.eye(spec[g].size) for g in groups})
    return dataclasses.replace(
        tr,
        matrices={**tr.matrices, **heads["matrices"]},
        dual=heads["dual"],
        duals=heads["duals"],
        info={"heads": groups},
    )


def stream_plan(model: nn.Module, spec: PermutationSpec, symmetry: str, gen, identity) -> Transforms:
    """`plan` for the stream's class: "signed" or "orthogonal"."""
    streams = check_admitted(model, spec, symmetry)
    plain = {g: frozenset((k, a) for k, a in spec[g].axes if owner(k) in norms_on(model, spec, g)) for g in streams}
    if symmetry == "orthogonal":
        folds = find_folds(model, spec, streams)
        check = FunctionCheck(model)
        for f in folds:
            if not check.holds(fold_state(check.state, (f,))):
                raise ValueError(
                    f"symmetry 'orthogonal' is refused: folding {owner(f.norm)}'s gain changes the function (its "
                    "output also goes elsewhere than its readers: the residual of a post-LN block); keep permutations"
                )
        folded = fold_state(check.state, folds)
        ones = frozenset(g for g in streams if any(is_layer_norm(m) for m in norms_on(model, spec, g).values()))
        trial = Transforms(
            identity,
            matrices={g: random_orthogonal(spec[g].size, gen, g in ones) for g in streams},
            plain=plain,
        )
        for g in streams:
            one = dataclasses.replace(trial, matrices={g: trial.matrices[g]})
            if not check.holds({k: one.tensor(spec, k, t) for k, t in folded.items()}):
                raise ValueError(f"symmetry 'orthogonal': an orthogonal map of group {g!r} changes the function")
        matrices = {g: torch.eye(spec[g].size) for g in streams}
        return Transforms(identity, matrices=matrices, plain=plain, fixes_ones=ones, folds=folds)
    check = FunctionCheck(model)
    signed: dict[str, frozenset] = {}
    for g in spec.groups:
        if g.blocks > 1:
            continue
        keys = [(k, a) for k, a in g.axes] + [(k, a) for k, a, _ in g.parts]
        modules = list(dict.fromkeys(owner(k) for k, _ in keys))
        candidates = [plain[g.name]] if g.name in plain else [frozenset()]
        candidates += [] if g.name in plain else [frozenset(x for x in keys if owner(x[0]) == m) for m in modules]
        signs = {g.name: torch.randint(0, 2, (g.size,), generator=gen).double() * 2 - 1}
        for c in candidates:
            if len(c) == len(keys):
                continue
            trial = Transforms(identity, signs=signs, plain={g.name: c})
            if check.holds({k: trial.tensor(spec, k, t) for k, t in check.state.items()}):
                signed[g.name] = c
                break
        else:
            if g.name in streams:
                raise ValueError(f"symmetry 'signed': flipping signs of group {g.name!r} changes the function")
    return Transforms(identity, signs={g: torch.ones(spec[g].size) for g in signed}, plain=signed)


def procrustes(cross: torch.Tensor, fix_ones: bool = False) -> torch.Tensor:
    """The orthogonal Q maximising <cross, Q> (Q = U V^T of cross = U S V^T); `fix_ones`: among those with Q1 = 1,
    Q = 11^T / n + B R B^T with R the Procrustes solution of B^T cross B (B: the complement of the ones)."""
    if fix_ones:
        n, b = len(cross), ones_complement(len(cross))
        return torch.full((n, n), 1.0 / n, dtype=torch.float64) + b @ procrustes(b.T @ cross @ b) @ b.T
    u, _, vh = torch.linalg.svd(cross)
    return u @ vh


def group_cross(spec, group, pairs, tr: Transforms, solved=None, ignore=()) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_plain, C_free): sum over pairs and tensors of A_k B_k^T with the group's units on the rows and b's other
    axes transformed; split into the plain tensors and the ones taking signs or the matrix. Tensors that carry an
    `ignore` group do not count (heads not matched yet)."""
    g = spec[group]
    plain, free = torch.zeros(g.size, g.size, dtype=torch.float64), torch.zeros(g.size, g.size, dtype=torch.float64)
    entries = [(k, a, None) for k, a in g.axes] + list(g.parts)
    for a, b in pairs:
        for key, axis, part in entries:
            if key not in a or (solved is not None and not spec.groups_on(key) - {group} <= solved):
                continue
            if spec.groups_on(key) & set(ignore):
                continue
            target = plain if (key, axis) in tr.plain.get(group, ()) else free
            if part is not None and part.within:  # b with the axis's other groups applied, as weight matching does
                b_k = tr.tensor(spec, key, b[key], except_group=group).movedim(axis, 0)
                add_within(target, g, part, a[key].movedim(axis, 0), b_k)
                continue
            b_k = tr.tensor(spec, key, b[key], except_axis=axis, axis_group=group).movedim(axis, 0)
            a_k = a[key].movedim(axis, 0)
            if part is not None:
                pos = part.positions(g.size)
                a_k, b_k = a_k[pos], b_k[pos]
            target += a_k.reshape(g.size, -1) @ b_k.reshape(g.size, -1).T
    return plain, free


def solve_group(spec, group, plain, free, tr: Transforms):
    """(new perm or matrix, objective value after, value of the current element) for one group."""
    g = spec[group]
    if group in tr.matrices:
        q = procrustes(free, group in tr.fixes_ones)
        return q, float((free * q).sum()), float((free * tr.matrices[group]).sum())
    cost = plain + free.abs() if group in tr.signs else plain + free
    perm = solve_assignment(cost, g.blocks, rigid=g.rigid_runs)
    return perm, matched_similarity(cost, perm), matched_similarity(cost, tr.perms[group])


def set_group(tr: Transforms, group: str, found, free: torch.Tensor) -> None:
    """Store a group's solution in place (the value object is only mutated while it is being found)."""
    if group in tr.matrices:
        tr.matrices[group] = found
        return
    tr.perms[group] = found
    if group in tr.signs:
        matched = free[torch.arange(len(found)), found]
        tr.signs[group] = torch.where(matched < 0, -1.0, 1.0).double()


def descend(spec, pairs, tr: Transforms, max_iter: int = 100, seed: int = 0, fixed=(), ignore=()) -> Transforms:
    """Coordinate descent as in `weight.solve_linear_matching`, from one layer-by-layer pass; a group with signs
    takes the best signs for its permutation, a group with a matrix its Procrustes solution. `fixed` groups keep
    their element (found elsewhere, e.g. from activations); tensors carrying an `ignore` group do not count."""
    solved = set(fixed)
    for group in spec.names:
        if group in fixed:
            continue
        plain, free = group_cross(spec, group, pairs, tr, solved, ignore)
        set_group(tr, group, solve_group(spec, group, plain, free, tr)[0], free)
        solved.add(group)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        improved, visited = False, set(fixed)
        for i in torch.randperm(len(spec.names), generator=gen).tolist():
            unit = spec.coupling_of(spec.names[i]) or (spec.names[i],)
            if visited & set(unit):
                continue
            visited.update(unit)
            crosses = [group_cross(spec, n, pairs, tr, ignore=ignore) for n in unit]
            if len(unit) > 1:
                sims = [p + f for p, f in crosses]
                new = solve_coupled(sims, spec[unit[0]].blocks, [spec[n].rigid_runs for n in unit])
                before = sum(matched_similarity(s, tr.perms[n]) for s, n in zip(sims, unit))
                after = sum(matched_similarity(s, p) for s, p in zip(sims, new))
                if after > before + 1e-12 * max(1.0, abs(before)):
                    tr.perms.update(zip(unit, new))
                    improved = True
                continue
            (plain, free), group = crosses[0], unit[0]
            found, after, before = solve_group(spec, group, plain, free, tr)
            if after > before + 1e-12 * max(1.0, abs(before)):
                set_group(tr, group, found, free)
                improved = True
            elif group in tr.signs:
                set_group(tr, group, tr.perms[group], free)  # the best signs for the permutation kept
        if not improved:
            break
    return tr


@dataclasses.dataclass
class SymmetryMatcher(Matcher):
    """Align model_b onto model_a by a class beyond permutations: `symmetry` on the stream, "permutation", "signed"
    (signed permutations of an RMSNorm stream and of gated MLP units) or "orthogonal" (Procrustes after folding the
    norms' gains), and `head_maps`: "none", "values" (an invertible map per attention head on its values) or "all"
    (values, and queries/keys: any invertible map, or rotation-scalings per frequency pair under a rotary
    embedding). `source` "weight" finds them on the weights; "activation" on `data` (signs by the cosines of the
    outputs that carry them, the stream's Procrustes on its norms' outputs, each head's map on one projection's
    outputs), whole heads and the other groups still by weight matching. `head_fit` "least_squares" (any invertible
    map, one side) or "procrustes" (orthogonal maps, both sides). Returns `Transforms` (merge with
    `transforms.merge_aligned`)."""

    name: ClassVar[str] = "symmetry"
    gives_permutations: ClassVar[bool] = False
    """`PermMerger.align` refuses it: its `Transforms` are merged by `merge_aligned`, not by the merger (yet)."""
    symmetry: str = "signed"
    head_maps: str = "none"
    head_fit: str = "least_squares"
    source: str = "weight"
    max_iter: int = 100
    seed: int = 0
    num_examples: int = 10000

    def __post_init__(self):
        SymmetrySettings(**self.settings)  # one declaration of the settings; its errors name the field

    def match(self, model_a: nn.Module, model_b: nn.Module, data=None) -> Transforms:
        spec = check_same_architecture(model_a, model_b)
        activations = self.source == "activation"
        if activations:
            check_matching_data(data, model_a)
            data = data.subset(self.num_examples)
        tr = plan(model_a, spec, self.symmetry, self.head_maps, self.seed)
        fixed = ()
        if activations and self.symmetry == "orthogonal":
            a, b = tr.reference(model_a), tr.reference(model_b)
            streams = [g for g in tr.matrices if g not in tr.info.get("heads", {})]
            for g, c in stream_cross(a, b, spec, streams, data).items():
                tr.matrices[g] = procrustes(c, g in tr.fixes_ones)
            fixed = tuple(streams)
        if activations and self.symmetry == "signed":
            fixed = signed_from_activations(model_a, model_b, spec, tr, data)
        named = set(spec.layout)
        sa, sb = (fold_state(m.state_dict(), tr.folds) for m in (model_a, model_b))
        pairs = [({k: sa[k].double() for k in named}, {k: sb[k].double() for k in named})]
        if self.head_maps != "none":  # the rest without the heads, then whole heads and their maps, then the rest
            heads = tuple(n for c in spec.couplings for n in c)
            tr = descend(spec, pairs, tr, self.max_iter, self.seed, fixed=fixed + heads, ignore=heads)
            moments = head_moments(model_a, model_b, spec, tr.info["heads"], data) if activations else None
            orthogonal = self.head_fit == "procrustes"
            fields = per_head.match_heads(model_a, spec, tr, tr.info["heads"], *pairs[0], moments, orthogonal)
            tr = dataclasses.replace(tr, **{k: {**getattr(tr, k), **v} for k, v in fields.items()})
            fixed = fixed + heads
        tr = descend(spec, pairs, tr, self.max_iter, self.seed, fixed)
        a, b = pairs[0]
        info = {
            "matcher": self.name,
            "settings": self.settings,
            "data": None if data is None else {"fingerprint": data.fingerprint, "num_examples": len(data)},
            "folded": [f.norm for f in tr.folds],
            # sum_k <A_k, B_k> over the spec's tensors (folded where the class folds), before and after: what is maximised
            "objective_identity": sum(float((a[k] * b[k]).sum()) for k in a),
            "objective_matched": sum(float((a[k] * tr.tensor(spec, k, b[k])).sum()) for k in a),
        }
        return dataclasses.replace(tr, info=info)
