"""From a traced model's labels to a `TracedSpec`: groups, their modules and unit axes, what was skipped."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Literal

import torch
from torch import nn

from ..spec import AxisPart, PermGroup, PermutationSpec
from .analysis import Analysis
from .export import traceable_call
from .heads import split_roots, whole_heads, without_lone_rigid_groups
from .invariance import InvarianceError, check_permutation_invariance
from .modules import group_modules
from .ops import PIN


@dataclasses.dataclass(frozen=True)
class TracedSpec:
    """What tracing found: the spec, and what it could not follow."""

    spec: PermutationSpec
    skipped: dict[str, str]
    """Candidate groups left unpermuted (named after their first producing module) -> why."""
    unit_axes: dict[str, dict[str, int]]
    """group -> {"activation": axis, "preactivation": axis} of the named modules' outputs."""
    repair_modules: tuple[str, ...]
    """Modules whose per-unit output statistics REPAIR can correct, in graph order: each producing layer of
    every group (or the norm right after it), residual branches included."""
    kept: dict[str, str] = dataclasses.field(default_factory=dict)
    """Candidate groups left in place by design, never an error (named as in `skipped`) -> why: units whose order
    an op fixes (a fused q/k/v projection split into parts, a grouped convolution's inputs; rotary or grouped-query
    heads only where their whole heads cannot move: see `PermGroup.rigid`)."""


def trace(
    model: nn.Module, example_inputs=None, on_unsupported: Literal["error", "skip"] = "error", check: bool = True
) -> TracedSpec:
    """Trace `model` and derive its permutation spec; see the module docstring for the rules.

    example_inputs: a tensor (the model's main input), a tuple of positional args or a dict of kwargs;
    by default random pixels shaped by `model.config`. check: verify on those inputs that randomly
    permuting every group leaves the outputs unchanged (raises naming the group that breaks it).
    """
    if on_unsupported not in ("error", "skip"):
        raise ValueError(f"on_unsupported={on_unsupported!r}; choose 'error' or 'skip'")
    call, inputs = traceable_call(model, example_inputs)
    was_training = model.training
    model.eval()  # BatchNorm as used for inference (no running-stat updates), dropout off
    try:
        with torch.no_grad():
            ep = torch.export.export(call, inputs, strict=False)
    except Exception as err:  # export's own errors are long; keep them, say what failed
        raise ValueError(f"cannot trace {type(model).__name__} with torch.export: {type(err).__name__}: {err}") from err
    finally:
        model.train(was_training)
    analysis = Analysis(ep, model)
    analysis.run()
    result = _build(analysis, model, on_unsupported)
    _check_coverage(model, result, on_unsupported)
    if check and result.spec.groups:
        try:
            try:
                check_permutation_invariance(model, result.spec, example_inputs)
            except InvarianceError:
                if not result.spec.couplings:
                    raise
                # heads that cannot move (a per-head bias, say): keep them in place and check again
                kept = dict(result.kept)
                spec = without_lone_rigid_groups(
                    PermutationSpec(result.spec.groups),
                    kept,
                    dict.fromkeys(
                        (g.name for g in result.spec.groups if g.rigid),
                        "its units keep their order within each head, and moving whole heads changes the outputs",
                    ),
                )
                unit_axes = {g: a for g, a in result.unit_axes.items() if g in spec.names}
                result = dataclasses.replace(result, spec=spec, kept=kept, unit_axes=unit_axes)
                check_permutation_invariance(model, result.spec, example_inputs)
        except InvarianceError as err:  # a group the rules followed wrongly: refuse it like any other
            reason = (
                "randomly permuting it changes the model's outputs (an op uses its units in a way the "
                "tracer's rules do not capture, e.g. attention heads split with the heads as the minor axis)"
            )
            if on_unsupported == "error":
                raise ValueError(
                    f"cannot derive a permutation spec for {type(model).__name__}: the units of "
                    f"{err.groups} cannot be permuted: {reason}. Pass on_unsupported='skip' to leave "
                    "such groups unpermuted."
                ) from err
            kept = tuple(g for g in result.spec.groups if g.name not in err.groups)
            couplings = tuple(c for c in result.spec.couplings if not set(c) & set(err.groups))
            result = dataclasses.replace(
                result,
                spec=PermutationSpec(kept, couplings),
                skipped={**result.skipped, **{g: reason for g in err.groups}},
                unit_axes={g: a for g, a in result.unit_axes.items() if g not in err.groups},
            )
            if kept:
                check_permutation_invariance(model, result.spec, example_inputs)
    return result


MIN_PERMUTED_SHARE = 0.5
"""A traced spec that permutes fewer of the model's parameters than this would merge the rest by plain averaging."""


def permuted_share(spec: PermutationSpec, state: dict) -> float:
    """The share of the model's parameter entries (tied weights once) that lie in a tensor the spec permutes."""
    named = set(spec.axes_to_perm())
    seen, total, moved = set(), 0, 0
    for key, t in state.items():
        if not t.is_floating_point() or (t.data_ptr(), tuple(t.shape)) in seen:
            continue
        seen.add((t.data_ptr(), tuple(t.shape)))
        total += t.numel()
        moved += t.numel() if key in named else 0
    return moved / total if total else 0.0


def _check_coverage(model: nn.Module, result: TracedSpec, on_unsupported: str) -> None:
    """No silent vanilla merge: a spec with no group, or one that leaves most parameters in place, is refused
    (or, with on_unsupported='skip', warned about loudly), naming why."""
    share = permuted_share(result.spec, model.state_dict())
    if result.spec.groups and share >= MIN_PERMUTED_SHARE:
        return
    why = {**result.skipped, **result.kept}
    reasons = "; ".join(f"{g}: {r}" for g, r in list(why.items())[:3]) or (
        "no layer whose output units could be permuted was found (no Linear, convolution or embedding "
        "this tracer knows)"
    )
    message = (
        f"the traced permutation spec of {type(model).__name__} "
        + ("has no permutation group" if not result.spec.groups else f"moves only {share:.0%} of its parameters")
        + f", so merging it would be mostly plain averaging: {reasons}"
    )
    if on_unsupported == "error":
        raise ValueError(message + ". Pass on_unsupported='skip' to merge it anyway.")
    warnings.warn(message, stacklevel=3)


def trace_permutation_spec(
    model: nn.Module, example_inputs=None, on_unsupported: Literal["error", "skip"] = "error", check: bool = True
) -> PermutationSpec:
    """The `PermutationSpec` of any module, derived from its traced graph (see `trace`).

    Groups are named after the first module that writes their units (`layers.0`), so a hand-written spec
    with other names is compared by `spec.equivalent(model.permutation_spec())`, not by `==`.
    """
    return trace(model, example_inputs, on_unsupported, check).spec


def _build(an: Analysis, model: nn.Module, on_unsupported: str) -> TracedSpec:
    uf = an.uf
    # a part that the graph joins back to its whole (rotate_half's halves, added to the unrotated units) is no part
    # of a fused projection: only the order it fixes (its keeps) remains
    an.parts = {e: p for e, p in an.parts.items() if uf.find(e) != uf.find(p[0])}
    pinned = uf.find(PIN)
    members: dict = {}
    for element in list(uf.parent):
        members.setdefault(uf.find(element), []).append(element)
    blocked: dict = {}
    for label, reason in an.blocks:
        blocked.setdefault(uf.find(label), reason)
    kept_roots: dict = {}
    extents: dict = {}  # root -> the extent of every op that fixes the order of its units (`Analysis.keep`)
    for label, reason, extent in an.keeps:
        kept_roots.setdefault(uf.find(label), reason)
        extents.setdefault(uf.find(label), []).append(extent)

    node_order = {n: i for i, n in enumerate(an.graph.nodes)}
    fused, unusable = split_roots(an, members)  # fused outputs: parent root -> its parts' roots; -> why they stay
    parent_of = {c: p for p, children in fused.items() for c in children}
    for p, children in fused.items():  # a part inherits what blocks or fixes its whole axis
        if p in unusable:
            kept_roots.setdefault(p, unusable[p])
            extents.setdefault(p, []).append(None)
        for c in children:
            if p in blocked:
                blocked.setdefault(c, blocked[p])
            if p in kept_roots:
                kept_roots.setdefault(c, kept_roots[p])
                extents.setdefault(c, []).extend(extents.get(p, []))

    def origins_of(elems) -> list:
        """The producing (node, weight key) of a class's elements; a part's are its fused projection's."""
        parents = {uf.find(an.parts[e][0]) for e in elems if e in an.parts}
        found = [o for e in elems for o in an.origins.get(e, [])]
        found += [o for p in parents for e in members.get(p, []) for o in an.origins.get(e, [])]
        return sorted(set(found), key=lambda o: node_order[o[0]])

    classes = []
    for root, elems in members.items():
        if root in fused and root not in unusable:
            continue  # a fused projection's output: its parts are the groups
        origins = origins_of(elems)  # a part is named and hooked after the projection it is a part of
        if root == pinned or not origins or parent_of.get(root) == pinned:
            continue
        classes.append((node_order[origins[0][0]], root, elems, origins))
    classes.sort(key=lambda c: c[0])

    state = model.state_dict(keep_vars=True)
    aliases = _aliases(state)
    position = {k: i for i, k in enumerate(state)}
    groups, skipped, kept, unit_axes, repair_modules = [], {}, {}, {}, []
    kept_reason: dict = {}  # rigid group -> why its units keep their order within blocks

    def group_name(origins, elems=()) -> str:
        """After its first producer (a tied weight by its first name in the state dict: the input embedding); a part
        of a fused projection after the projection and where its first part starts (`c_attn@0`)."""
        key = min(aliases.get(origins[0][1], [origins[0][1]]), key=position.__getitem__)
        starts = [an.parts[e][1] for e in elems if e in an.parts]
        return key.rsplit(".", 1)[0] + (f"@{min(starts)}" if starts else "")

    def part_size(e) -> int | None:
        """Units of a part element: its width in each run, times the runs (heads) of the projection's output (None
        for a part of an axis no tensor carries)."""
        label, _, width, in_size = an.parts[e]
        full = next((an.param_axes[pe][2] for pe in members[uf.find(label)] if pe in an.param_axes), None)
        return None if full is None else width * (full // in_size)

    def part_entries(elems) -> tuple[list, AxisPart | None, int | None]:
        """The parts among `elems` as positions on each tensor of the projection they are parts of: ([(key, axis,
        part)], the part of the projection's output that carries the first (for activation matching), units)."""
        entries, first, size = [], None, None
        for e in sorted((e for e in elems if e in an.parts), key=lambda e: an.parts[e][1]):
            label, start, width, in_size = an.parts[e]
            for pe in members[uf.find(label)]:
                if pe not in an.param_axes:
                    continue
                key, axis, full = an.param_axes[pe]
                part = AxisPart(start, width, in_size if in_size < full else 0)
                size = width * (full // in_size)
                first = first or part
                entries += [(alias, axis, part) for alias in aliases.get(key, [key])]
        return sorted(set(entries), key=lambda e: (position[e[0]], e[1], e[2].start)), first, size

    def heads_of(root) -> set:
        return {h for lab, h in an.head_splits if uf.find(lab) == root}

    def add_group(name, root, elems, origins, blocks, heads, rigid=False, runs=1, extra_parts=()) -> None:
        parts, activation_part, units = part_entries(elems)
        parts = parts + list(extra_parts)
        first = min((e for e in elems if e in an.parts), key=lambda e: an.parts[e][1], default=None)
        unit_root = uf.find(an.parts[first][0]) if first is not None else root  # a part's units: its projection's
        pre, act, axis_pre, axis_act, sites = group_modules(an, unit_root, origins)
        if parts and act is not None and act != pre:
            act = None  # only the projection's output is known to carry the part on its unit axis
        if not heads:  # attention projections are not REPAIRed: their outputs are logits' factors
            repair_modules.extend(sites)
        axis = axis_act if act is not None else axis_pre
        if pre is not None and act is not None and axis_pre != axis_act:
            pre = None  # one unit axis per group: keep the one activation matching uses by default
        axes = sorted(
            {
                (alias, an.param_axes[e][1])
                for e in elems
                if e in an.param_axes
                for alias in aliases.get(an.param_axes[e][0], [an.param_axes[e][0]])
            },
            key=lambda ka: (position[ka[0]], ka[1]),
        )
        own = next((e for e in elems if e in an.param_axes), None)
        size = an.param_axes[own][2] if own is not None else units
        groups.append(
            PermGroup(
                name,
                size,
                tuple(axes),
                parts=tuple(parts),
                activation_part=activation_part if (act or pre) is not None else None,
                activation=act or pre,
                preactivation=pre,
                unit_axis=axis if axis is not None else 1,
                blocks=blocks,
                rigid=rigid,
                runs=runs,
            )
        )
        unit_axes[name] = {k: v for k, v in (("activation", axis_act), ("preactivation", axis_pre)) if v is not None}

    def add_grouped_query(parts, kv, rq, rv) -> None:
        """Grouped-query (and multi-query) attention as three groups whose `kv` blocks move together: the queries
        with the output projection's inputs (rigid: the query heads of a block permute among themselves, `runs`), the
        keys (rigid under rotary embeddings; else their units move within a head, alike on the queries of every
        query head that reads it: a `within` part) and the values (units moving within a head, alike on the output
        projection's inputs of every query head that reads it)."""
        wide, narrow = parts
        runs = sizes[wide[0][0]] // sizes[narrow[0][0]]
        width = sizes[narrow[0][0]] // kv
        queries, outputs = [e for e, r in wide if r == rq], [e for e, r in wide if r == rv]
        keys, values = [e for e, r in narrow if r == rq], [e for e, r in narrow if r == rv]
        repeated = AxisPart(0, width, runs * width, runs, width, within=True)

        def within_parts(elems):  # one key/value head's units on every query head reading it
            return [
                (alias, an.param_axes[e][1], repeated)
                for e in elems
                if e in an.param_axes
                for alias in aliases.get(an.param_axes[e][0], [an.param_axes[e][0]])
            ]

        keys_rigid = rq in kept_roots or any(e in an.parts for e in queries)
        why = next((kept_roots[r] for r in (rq, rv) if r in kept_roots), "grouped-query attention")
        plan = [
            (queries + outputs, rq, True, runs, ()),
            (keys, rq, keys_rigid, 1, () if keys_rigid else within_parts(queries)),
            (values, rv, False, 1, within_parts(outputs)),
        ]
        names = []
        for elems_g, root_g, rigid, runs_g, extra in plan:
            own = sorted((o for e in elems_g for o in an.origins.get(e, [])), key=lambda o: node_order[o[0]])
            origins_g = own or origins_of(elems_g)
            name = group_name(origins_g, [e for e in elems_g if e not in outputs] or elems_g)
            if kv == 1 and rigid and runs_g == 1:  # multi-query: the one key head stays where it is
                kept[name] = (
                    "multi-query attention: its one key/value head is read by every query head, so its key units "
                    "keep their order (the query heads permute among themselves, the value units too)"
                )
                continue
            kept_reason[name] = why
            add_group(name, root_g, elems_g, origins_g, kv, True, rigid, runs_g, extra)
            names.append(name)
        if kv > 1:
            couplings.append(tuple(names))

    sizes = {e: an.param_axes[e][2] for e in an.param_axes}
    sizes |= {e: n for e in an.parts if (n := part_size(e)) is not None}
    rigid_roots, shared = whole_heads(an, members, blocked, kept_roots, extents, heads_of, sizes)
    couplings, regrouped = [], set()
    for _, root, elems, origins in classes:
        name = group_name(origins, elems)
        if root in shared:  # grouped-query attention: regrouped (`whole_heads`), once for both roots
            if id(shared[root]) not in regrouped:
                regrouped.add(id(shared[root]))
                add_grouped_query(*shared[root])
            continue
        reason = blocked.get(root)
        if reason is None and root in kept_roots and root not in rigid_roots:
            kept[name] = kept_roots[root]
            continue
        if reason is not None:
            if on_unsupported == "error":
                raise ValueError(
                    f"cannot derive a permutation spec for {type(model).__name__}: the units produced by "
                    f"{name!r} cannot be permuted: {reason}. Pass on_unsupported='skip' to leave such "
                    "groups unpermuted."
                )
            skipped[name] = reason
            continue
        heads = heads_of(root)
        split = heads | {g for lab, g in an.conv_groups if uf.find(lab) == root}
        if len(split) > 1:
            why = f"its units are split into {sorted(split)} heads or convolution groups in different places"
            if on_unsupported == "error":
                raise ValueError(
                    f"cannot derive a permutation spec for {type(model).__name__}: the units produced by {name!r}: {why}"
                )
            skipped[name] = why
            continue
        if root in rigid_roots:
            kept_reason[name] = kept_roots[root]
        add_group(name, root, elems, origins, split.pop() if split else 1, bool(heads), root in rigid_roots)
    name_of = {root: group_name(origins, elems) for _, root, elems, origins in classes}
    built = {g.name: g for g in groups}
    for qk, v in an.head_couplings:
        pair = tuple(dict.fromkeys(name_of.get(uf.find(lab)) for lab in (qk, v)))
        if (
            len(pair) == 2
            and all(n in built and built[n].blocks > 1 for n in pair)
            and built[pair[0]].blocks == built[pair[1]].blocks
            and not any(set(pair) & set(c) for c in couplings)  # grouped-query layers are coupled already
        ):
            couplings.append(pair)
    spec = without_lone_rigid_groups(PermutationSpec(tuple(groups), tuple(couplings)), kept, kept_reason)
    spec.validate(model.state_dict())
    unit_axes = {g: a for g, a in unit_axes.items() if g in spec.names}
    first_call = {}
    for node in an.graph.nodes:
        first_call.setdefault(an.module_of.get(node), node_order[node])
    repair_modules.sort(key=lambda m: first_call.get(m, 0))
    return TracedSpec(spec, skipped, unit_axes, tuple(repair_modules), kept)


def _aliases(state: dict) -> dict[str, list[str]]:
    """key -> every state-dict key sharing its storage (tied weights): all must be permuted alike."""
    by_ptr: dict = {}
    for k, t in state.items():
        if t.numel():
            by_ptr.setdefault((t.data_ptr(), tuple(t.shape)), []).append(k)
    return {k: keys for keys in by_ptr.values() for k in keys}


def attach_permutation_spec(model: nn.Module, spec: PermutationSpec | None = None, **trace_kwargs) -> nn.Module:
    """Give a model without `permutation_spec()` (a transformers ViT, your own module) a traced one,
    so the matchers and `Permutations.apply` accept it. Returns the model (changed in place)."""
    spec = spec if spec is not None else trace_permutation_spec(model, **trace_kwargs)
    model.permutation_spec = lambda: spec
    return model
