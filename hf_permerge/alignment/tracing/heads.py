"""How the label classes regroup into attention groups: fused projections' parts, whole heads that move (rigid
groups, grouped- and multi-query attention), rigid groups that cannot move alone."""

from __future__ import annotations

from ..spec import PermutationSpec
from .analysis import Analysis


def split_roots(an: Analysis, members: dict) -> tuple[dict, dict]:
    """Fused projections: the classes split into parts (`Analysis.part`), each -> the classes of its parts; and
    those whose parts cannot move on their own -> why (then the projection and its parts stay in place, as any
    kept group): the projection's whole output is also read by a layer, or a part is split again."""
    uf = an.uf
    split: dict = {}
    for element, (label, *_) in an.parts.items():
        split.setdefault(uf.find(label), set()).add(uf.find(element))
    unusable = {}
    for root, children in split.items():
        producers = {key.rsplit(".", 1)[0] for e in members.get(root, []) for _, key in an.origins.get(e, [])}
        readers = sorted(
            {
                an.param_axes[e][0]
                for e in members.get(root, [])
                if e in an.param_axes and an.param_axes[e][0].rsplit(".", 1)[0] not in producers
            }
        )
        if readers or children & set(split) or root in children:
            why = f"{readers[0]!r} reads the whole output" if readers else "a part of it is split again"
            unusable[root] = (
                f"the output of {sorted(producers) or ['a fused projection']} is split into parts, but {why}, so "
                "its parts cannot be permuted separately"
            )
    return split, unusable


def without_lone_rigid_groups(spec: PermutationSpec, kept: dict, kept_reason: dict) -> PermutationSpec:
    """A rigid group outside every coupling never moves: it is left out, as kept (with its reason)."""
    coupled = {n for c in spec.couplings for n in c}
    lone = [g.name for g in spec.groups if g.rigid and g.runs == 1 and g.name not in coupled]
    for name in lone:
        kept[name] = kept_reason[name]
    return PermutationSpec(tuple(g for g in spec.groups if g.name not in lone), spec.couplings)


def whole_heads(an: Analysis, members: dict, blocked: dict, kept_roots: dict, extents: dict, heads_of, sizes: dict):
    """Attention groups whose units keep their order only within each head (a rotary embedding pairs a head's
    units by position, grouped-query values are shared by several query heads) still move whole heads, with
    their attention op's coupling: (roots that become rigid groups, grouped-query plans).

    One key/value head per query head: the query/key group becomes rigid (its units stay in order within each
    head), the value group is blocked as before. Grouped-query attention (`kv` key/value heads, each shared by
    `heads / kv` consecutive query heads): the query/key label holds tensors of two widths, the value label too
    (the output projection reads every query head's values), so they are regrouped by width: the queries and the
    output projection's inputs, and the keys and values, each rigid in `kv` blocks, coupled. Plan: root ->
    (((element, root) of the wide part, ... of the narrow part), kv). Every op that fixed an order must have seen
    at most one head's units (its extent); the invariance check in `trace` tests the rest."""
    uf = an.uf
    rigid, shared = set(), {}

    def within(root, width) -> bool:
        return all(e is not None and e <= width for e in extents.get(root, []))

    for qk, v in an.head_couplings:
        rq, rv = uf.find(qk), uf.find(v)
        if rq == rv or rq in blocked or rv in blocked:
            continue
        params = [(e, r) for r in (rq, rv) for e in members.get(r, []) if e in sizes]  # tensors' axes and parts
        widths = {sizes[e] for e, _ in params}
        hq, hv = heads_of(rq), heads_of(rv)
        if len(widths) == 1 and len(hq) == 1 and hq == hv:
            width = next(iter(widths)) // next(iter(hq))
            rigid.update(r for r in (rq, rv) if r in kept_roots and within(r, width))
        elif len(widths) == 2 and (len(hq) == 2 and len(hv) == 1 and hv < hq or len(hq) == 1 and not hv):
            (kv,), (narrow, wide) = hv or {1}, sorted(widths)  # no head split of the values: one key/value head
            width = narrow // kv
            if narrow % kv == 0 and wide == max(hq) * width and within(rq, width) and within(rv, width):
                parts = tuple([(e, r) for e, r in params if sizes[e] == n] for n in (wide, narrow))
                if all(any(an.origins.get(e) or e in an.parts for e, _ in part) for part in parts):  # a producer each
                    shared[rq] = shared[rv] = (parts, kv, rq, rv)
    return rigid, shared
