"""Per-head invertible maps (Theus et al. 2025): a head's values by any invertible B with the output projection's
inputs by B^-T, its queries by any invertible A with its keys by A^-T; the scores and outputs are unchanged.

Each coupled attention group has a primary side (value rows, or query rows) and a dual side (output projection
inputs, or key rows), told apart by the layer kind (a Linear's rows are outputs, a GPT-2 Conv1D's columns; a bias
is an output). Heads are matched whole by what no per-head map changes (X_primary^T X_dual per head), then each
head's map is the least-squares fit on the primary side, M = A_h B_h^+ (exact for a planted element), or (`head_fit`
"procrustes") the orthogonal map best on both sides, well conditioned where a one-sided fit of unrelated nets is not.
A rotary embedding pins the query/key units of a head (`PermGroup.rigid`): it rotates each frequency pair of units
by a position's angle, so only a rotation-scaling [[a, -b], [b, a]] per pair commutes with it (queries by it, keys
by its inverse transpose); units a partial rotary leaves alone take any invertible map. Which units pair up (the
halves of a head or of its rotary part, as `rotate_half` does, or neighbours) is found by trying each on the model;
the pair's (a, b) is the least-squares fit, a = <A, B> / |B|^2, b = <A, JB> / |B|^2.
"""

from __future__ import annotations

import torch
from torch import nn

from .folding import FunctionCheck, owner
from .hungarian import solve_assignment
from .spec import PermutationSpec
from .transforms import Transforms, side


def is_output(model: nn.Module, key: str, axis: int, ndim: int) -> bool:
    """Whether `axis` of `key` carries its layer's outputs (a bias always does)."""
    if ndim == 1:
        return True
    module = model.get_submodule(owner(key))
    if hasattr(module, "out_features"):  # nn.Linear: (out, in)
        return axis == 0
    if hasattr(module, "nf"):  # transformers' Conv1D (GPT-2): (in, out)
        return axis == 1
    raise ValueError(f"per-head maps: cannot tell inputs from outputs of {owner(key)} ({type(module).__name__})")


def sides(model: nn.Module, spec: PermutationSpec, group: str) -> tuple[str, list, list]:
    """(kind, primary, dual): kind "values" (outputs by B, the readers by B^-T), "queries_keys" (one projection's
    outputs by A, the other's by A^-T) or "other" (one projection's outputs alone: grouped-query keys); primary and
    dual list (key, axis, part) entries."""
    g, state = spec[group], model.state_dict()
    entries = [(k, a, None) for k, a in g.axes] + list(g.parts)
    outputs = [e for e in entries if is_output(model, e[0], e[1], state[e[0]].ndim)]
    readers = [e for e in entries if e not in outputs]
    if readers:
        return "values", outputs, readers
    by_side: dict[tuple, list] = {}
    for e in outputs:
        by_side.setdefault((owner(e[0]), None if e[2] is None else e[2].start), []).append(e)
    if len(by_side) != 2:
        return "other", outputs, []
    primary, dual = by_side.values()
    return "queries_keys", primary, dual


def rows(spec: PermutationSpec, group: str, entries, state, tr: Transforms | None = None) -> torch.Tensor:
    """(size, columns): every entry's tensor with the group's units on the rows (b's other axes transformed by
    `tr`), side by side."""
    g = spec[group]
    out = []
    for key, axis, part in entries:
        t = state[key] if tr is None else tr.tensor(spec, key, state[key], except_axis=axis, axis_group=group)
        t = t.movedim(axis, 0)
        if part is not None:
            t = t[part.positions(g.size)[:, 0]]
        out.append(t.reshape(g.size, -1).double())
    return torch.cat(out, 1)


def rotary_module(model: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if "Rotary" in type(m).__name__), "a rotary embedding")


ROTARY = "rotary"
"""A rigid query/key group's pairs before they are found (`pairings`)."""


def pairings(width: int) -> dict[str, torch.Tensor]:
    """The layouts of a head's frequency pairs to try, (pairs, 2) unit indices: the halves of the first r units
    (`rotate_half`) or neighbours, for r = the head's width, half or a quarter of it (a partial rotary embedding: the
    other units are not rotated, so any invertible map of them is free)."""
    out = {}
    for r in (width, width // 2, width // 4):
        if r >= 2 and r % 2 == 0:
            half = torch.arange(r // 2)
            out[f"halves of {r}"] = torch.stack([half, half + r // 2], 1)
            out[f"neighbours of {r}"] = torch.arange(r).view(-1, 2)
    return out


def free_units(pairs: torch.Tensor, width: int) -> torch.Tensor:
    """The units of a head outside its rotary pairs."""
    taken = torch.zeros(width, dtype=torch.bool)
    taken[pairs.flatten()] = True
    return torch.arange(width)[~taken]


def rotation_scaling(pairs: torch.Tensor, width: int, ab: torch.Tensor) -> torch.Tensor:
    """(width, width): [[a, -b], [b, a]] on each pair (i, j) of `pairs`, with ab[p] = (a, b)."""
    m = torch.zeros(width, width, dtype=torch.float64)
    i, j = pairs[:, 0], pairs[:, 1]
    m[i, i], m[i, j], m[j, i], m[j, j] = ab[:, 0], -ab[:, 1], ab[:, 1], ab[:, 0]
    return m


def admitted(model: nn.Module, spec: PermutationSpec, head_maps: str) -> dict[str, tuple]:
    """The groups that take per-head maps (group -> (primary, dual, pairs): pairs None for any invertible map, or
    `ROTARY` for a rigid query/key group, whose pairs `pairings` offers), or a ValueError in one line naming what
    forbids the class."""
    found = {}
    for coupled in spec.couplings:
        kinds = {name: sides(model, spec, name)[0] for name in coupled}
        if head_maps == "all" and "queries_keys" not in kinds.values():
            raise ValueError(
                f"head_maps 'all' is refused: the queries and keys of {owner(coupled[0])} are in different groups "
                "(grouped-query heads): maps of one by the other's inverse transpose are not supported; use "
                "head_maps 'values'"
            )
        for name in coupled:
            kind, primary, dual = sides(model, spec, name)
            if kind == "other":
                continue
            if spec[name].rigid:
                if head_maps == "all" and kind == "queries_keys" and spec[name].size % 2 == 0:
                    found[name] = (primary, dual, ROTARY)
                continue
            if kind == "values" or head_maps == "all":
                found[name] = (primary, dual, None)
    if not found:
        raise ValueError(
            f"head_maps {head_maps!r} is refused: no attention group of {type(model).__name__} takes per-head maps"
        )
    return found


def block_diagonal(blocks: list[torch.Tensor]) -> torch.Tensor:
    return torch.block_diag(*blocks)


def element(spec: PermutationSpec, groups: dict, matrices: dict[str, torch.Tensor]) -> dict:
    """The Transforms fields of per-head maps: each group's matrix, its dual sides and their M^-T."""
    return {
        "matrices": matrices,
        "dual": {g: frozenset(side(*e) for e in groups[g][1]) for g in matrices},
        "duals": {g: torch.linalg.inv(m).T for g, m in matrices.items()},
    }


def random_element(spec: PermutationSpec, groups: dict, gen: torch.Generator) -> dict:
    """Random maps per head, well conditioned (identity plus noise; rotation-scalings on the pairs of a rotary
    group), for testing a class on a model."""
    matrices = {}
    for g, (_, _, pairs) in groups.items():
        w = spec[g].size // spec[g].blocks
        heads = []
        for _ in range(spec[g].blocks):
            if pairs is None:
                heads.append(
                    torch.eye(w, dtype=torch.float64) + 0.3 * torch.randn(w, w, generator=gen, dtype=torch.float64)
                )
            else:
                ab = torch.rand(len(pairs), 2, generator=gen, dtype=torch.float64) + torch.tensor([0.5, -0.5])
                m, free = rotation_scaling(pairs, w, ab), free_units(pairs, w)
                noise = 0.3 * torch.randn(len(free), len(free), generator=gen, dtype=torch.float64)
                m[free[:, None], free] = torch.eye(len(free), dtype=torch.float64) + noise
                heads.append(m)
        matrices[g] = block_diagonal(heads)
    return element(spec, groups, matrices)


def fit_heads(cab: torch.Tensor, cbb: torch.Tensor, pairs: torch.Tensor | None, orthogonal: bool = False):
    """Each head's map M with M b ~ a, from its moments cab = sum a b^T and cbb = sum b b^T, stacked (heads, w, w)
    (rows of weights, or activations): least squares over every invertible map (cab cbb^-1, one batched solve) or
    over the rotation-scalings of `pairs` (a = <a, b> / |b|^2, b = <a, J b> / |b|^2 per pair), with any invertible
    map of the units outside them (the fit separates: M has no entries between the two). `orthogonal`: the
    orthogonal M maximising <cab, M> instead (Procrustes; pure rotations on the pairs), where M^-T = M."""
    if pairs is None:
        if orthogonal:
            u, _, vh = torch.linalg.svd(cab)
            return u @ vh
        return torch.linalg.solve(cbb, cab.transpose(1, 2)).transpose(1, 2)  # cbb is symmetric
    i, j = pairs[:, 0], pairs[:, 1]
    ab = torch.stack([cab[:, i, i] + cab[:, j, j], cab[:, j, i] - cab[:, i, j]], -1)
    norm = ab.norm(dim=-1) if orthogonal else cbb[:, i, i] + cbb[:, j, j]
    out = torch.stack([rotation_scaling(pairs, cab.shape[-1], h) for h in ab / norm[..., None]])
    free = free_units(pairs, cab.shape[-1])
    if len(free):
        sub = (slice(None), free[:, None], free)
        out[sub] = fit_heads(cab[sub], cbb[sub], None, orthogonal)
    return out


def diagonal_blocks(m: torch.Tensor, blocks: int) -> torch.Tensor:
    """(blocks, w, w): the diagonal blocks of a (blocks * w, blocks * w) matrix."""
    w = len(m) // blocks
    return torch.stack([m[h * w : (h + 1) * w, h * w : (h + 1) * w] for h in range(blocks)])


def head_moments_of_rows(xa: torch.Tensor, xb: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, (sum a b^T, sum b b^T) over the columns of two (units, columns) row sets: batched, never the full
    units x units product (a group's work grows with its heads, not with their square)."""
    a, b = xa.view(blocks, -1, xa.shape[1]), xb.view(blocks, -1, xb.shape[1])
    return a @ b.transpose(1, 2), b @ b.transpose(1, 2)


def match_heads(
    model: nn.Module,
    spec: PermutationSpec,
    tr: Transforms,
    groups: dict,
    a: dict,
    b: dict,
    moments=None,
    orthogonal: bool = False,
) -> dict:
    """Whole heads by their per-head invariants, then each group's map (least squares on the primary side's weights,
    or on `moments`: group -> (sum a b^T, sum b b^T, dual) of one side's activations, `dual` when that side takes
    M^-T; `orthogonal`: Procrustes, on both sides' weights) or, for a group without maps, its within-head
    permutation; returns the Transforms fields of the maps, the permutations set in `tr.perms`."""
    from .beyond import group_cross  # the shared cross-product of one group (beyond imports this module)

    matrices = {}
    for coupled in spec.couplings:
        blocks = spec[coupled[0]].blocks
        score = torch.zeros(blocks, blocks, dtype=torch.float64)
        for name in coupled:
            _, primary, dual = sides(model, spec, name)
            w = spec[name].size // blocks
            inv = {}
            for which, state, t in (("a", a, None), ("b", b, tr)):
                x1 = rows(spec, name, primary, state, t)
                x2 = rows(spec, name, dual, state, t) if dual else x1  # keys alone: their Gram matrix per head
                inv[which] = torch.stack([x1[h * w : (h + 1) * w].T @ x2[h * w : (h + 1) * w] for h in range(blocks)])
            score += torch.einsum("ipq,jpq->ij", inv["a"], inv["b"])
        sigma = solve_assignment(score)
        whole = {
            n: torch.cat([int(s) * (spec[n].size // blocks) + torch.arange(spec[n].size // blocks) for s in sigma])
            for n in coupled
        }
        tr.perms.update(whole)  # every group's heads moved before any within-head term is scored
        for name in coupled:
            g, heads = spec[name], whole[name]
            if name in groups:
                if moments is None:
                    xa, xb = rows(spec, name, groups[name][0], a), rows(spec, name, groups[name][0], b, tr)[heads]
                    (cab, cbb), dual = head_moments_of_rows(xa, xb, blocks), False
                    if orthogonal:  # M^-T = M: the dual side's rows count alike
                        da, db = rows(spec, name, groups[name][1], a), rows(spec, name, groups[name][1], b, tr)[heads]
                        cab = cab + head_moments_of_rows(da, db, blocks)[0]
                else:
                    cab, cbb, dual = moments[name]
                    cab, cbb = diagonal_blocks(cab[:, heads], blocks), diagonal_blocks(cbb[heads][:, heads], blocks)
                fits = fit_heads(cab, cbb, groups[name][2], orthogonal)
                if dual:
                    fits = torch.linalg.inv(fits).transpose(1, 2)
                matrices[name] = block_diagonal(list(fits))
            else:  # permutations within the heads (none for a rigid group, its runs for grouped queries)
                plain, free = group_cross(spec, name, [(a, b)], tr)
                tr.perms[name] = heads[solve_assignment((plain + free)[:, heads], blocks, rigid=g.rigid_runs)]
    return element(spec, groups, matrices)


def plan_heads(model: nn.Module, spec: PermutationSpec, head_maps: str, gen: torch.Generator) -> dict:
    """`admitted`'s groups with each rotary group's pair layout found: the first whose random rotation-scalings keep
    the function; refused in one line where none does."""
    groups = admitted(model, spec, head_maps)
    check = FunctionCheck(model)
    identity = {g.name: torch.arange(g.size) for g in spec.groups}
    for g, (primary, dual, pairs) in list(groups.items()):
        options = pairings(spec[g].size // spec[g].blocks) if pairs == ROTARY else {"": None}
        for layout in options.values():
            groups[g] = (primary, dual, layout)
            one = Transforms(identity, **random_element(spec, {g: groups[g]}, gen))
            if check.holds({k: one.tensor(spec, k, t) for k, t in check.state.items()}):
                break
        else:
            raise ValueError(
                f"head_maps {head_maps!r} is refused: {rotary_module(model)} pins the query/key units of {g} and no "
                "rotation-scaling of their frequency pairs (halves or neighbours, of all or part) keeps the function; "
                "use head_maps 'values'"
                if pairs == ROTARY
                else f"head_maps {head_maps!r}: an invertible map per head of group {g!r} changes the function"
            )
    return groups
