"""From a traced model's labels to a `TracedSpec`: groups, their modules and unit axes, what was skipped."""

from __future__ import annotations

import dataclasses
import operator
from typing import Literal

import torch
from torch import nn

from ..spec import PermGroup, PermutationSpec
from .analysis import Analysis
from .export import traceable_call
from .invariance import InvarianceError, check_permutation_invariance
from .ops import BATCH_NORMS, GROUP_NORMS, LAYER_NORMS, NONLINEAR, PIN, op_name


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
    if check and result.spec.groups:
        try:
            try:
                check_permutation_invariance(model, result.spec, example_inputs)
            except InvarianceError:
                if not result.spec.couplings:
                    raise
                # heads that cannot move (a per-head bias, say): keep them in place and check again
                result = dataclasses.replace(result, spec=PermutationSpec(result.spec.groups))
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
    pinned = uf.find(PIN)
    members: dict = {}
    for element in list(uf.parent):
        members.setdefault(uf.find(element), []).append(element)
    blocked: dict = {}
    for label, reason in an.blocks:
        blocked.setdefault(uf.find(label), reason)

    node_order = {n: i for i, n in enumerate(an.graph.nodes)}
    classes = []
    for root, elems in members.items():
        origins = [o for e in elems for o in an.origins.get(e, [])]
        if root == pinned or not origins:
            continue
        origins.sort(key=lambda o: node_order[o[0]])
        classes.append((node_order[origins[0][0]], root, elems, origins))
    classes.sort(key=lambda c: c[0])

    state = model.state_dict(keep_vars=True)
    aliases = _aliases(state)
    position = {k: i for i, k in enumerate(state)}
    groups, skipped, unit_axes, repair_modules = [], {}, {}, []
    for _, root, elems, origins in classes:
        name = origins[0][1].rsplit(".", 1)[0]
        axes = sorted(
            {
                (alias, an.param_axes[e][1])
                for e in elems
                if e in an.param_axes
                for alias in aliases.get(an.param_axes[e][0], [an.param_axes[e][0]])
            },
            key=lambda ka: (position[ka[0]], ka[1]),
        )
        reason = blocked.get(root)
        keys = [k for k, _ in axes]
        if reason is None and len(set(keys)) != len(keys):
            twice = sorted({k for k in keys if keys.count(k) > 1})
            reason = (
                f"the group would permute two axes of {twice[0]!r} (its input and output are tied, e.g. by a "
                "residual connection around a single layer); the spec allows one axis per tensor"
            )
        if reason is not None:
            if on_unsupported == "error":
                raise ValueError(
                    f"cannot derive a permutation spec for {type(model).__name__}: the units produced by "
                    f"{name!r} cannot be permuted: {reason}. Pass on_unsupported='skip' to leave such "
                    "groups unpermuted."
                )
            skipped[name] = reason
            continue
        size = an.param_axes[next(e for e in elems if e in an.param_axes)][2]
        heads = {h for lab, h in an.head_splits if uf.find(lab) == root}
        if len(heads) > 1 and on_unsupported == "error":
            raise ValueError(
                f"cannot derive a permutation spec for {type(model).__name__}: the units produced by "
                f"{name!r} are split into {sorted(heads)} heads in different places"
            )
        if len(heads) > 1:
            skipped[name] = f"its units are split into {sorted(heads)} heads in different places"
            continue
        blocks = heads.pop() if heads else 1
        pre, act, axis_pre, axis_act, sites = _modules(an, root, origins)
        if blocks == 1:  # attention projections are not REPAIRed: their outputs are logits' factors
            repair_modules += sites
        axis = axis_act if act is not None else axis_pre
        if pre is not None and act is not None and axis_pre != axis_act:
            pre = None  # one unit axis per group: keep the one activation matching uses by default
        groups.append(
            PermGroup(
                name,
                size,
                tuple(axes),
                activation=act or pre,
                preactivation=pre,
                unit_axis=axis if axis is not None else 1,
                blocks=blocks,
            )
        )
        unit_axes[name] = {k: v for k, v in (("activation", axis_act), ("preactivation", axis_pre)) if v is not None}
    name_of = {root: origins[0][1].rsplit(".", 1)[0] for _, root, _, origins in classes}
    built = {g.name: g for g in groups}
    couplings = []
    for qk, v in an.head_couplings:
        pair = tuple(dict.fromkeys(name_of.get(uf.find(lab)) for lab in (qk, v)))
        if (
            len(pair) == 2
            and all(n in built and built[n].blocks > 1 for n in pair)
            and built[pair[0]].blocks == built[pair[1]].blocks
            and pair not in couplings
        ):
            couplings.append(pair)
    spec = PermutationSpec(tuple(groups), tuple(couplings))
    spec.validate(model.state_dict())
    first_call = {}
    for node in an.graph.nodes:
        first_call.setdefault(an.module_of.get(node), node_order[node])
    repair_modules.sort(key=lambda m: first_call.get(m, 0))
    return TracedSpec(spec, skipped, unit_axes, tuple(repair_modules))


def _aliases(state: dict) -> dict[str, list[str]]:
    """key -> every state-dict key sharing its storage (tied weights): all must be permuted alike."""
    by_ptr: dict = {}
    for k, t in state.items():
        if t.numel():
            by_ptr.setdefault((t.data_ptr(), tuple(t.shape)), []).append(k)
    return {k: keys for keys in by_ptr.values() for k in keys}


def _single_op_module(an: Analysis, node) -> str | None:
    """The module whose whole forward is this one op (and is called once): its output is the node's output."""
    path = an.module_of.get(node)
    if not path or len(an.module_calls.get(path, ())) != 1:
        return None
    if an.module_nodes.get(path) != [node]:
        return None
    return path


def _unit_axis(an: Analysis, node, root) -> int | None:
    labels = an.labels.get(node)
    labels = labels[0] if isinstance(labels, list) else labels
    for i, label in enumerate(labels or ()):
        if label is not None and an.uf.find(label) == root:
            return i
    return None


def _users(node) -> list:
    """Users, looking through `getitem(x, 0)` of ops returning tuples (native batch/layer norm)."""
    out = []
    for u in node.users:
        if u.target is operator.getitem and u.args[1] == 0:
            out += [(v, u) for v in u.users]
        elif u.target is not operator.getitem:
            out.append((u, node))
    return out


def _chain_end(an: Analysis, origin_node):
    """Follow a producing layer through norms that only it feeds: the per-unit affine output REPAIR corrects."""
    cur = origin_node
    while True:
        users = _users(cur)
        if len(users) != 1:
            return cur
        user, via = users[0]
        name = op_name(user) if user.op == "call_function" else ""
        if (
            (name in BATCH_NORMS or name in LAYER_NORMS or name in GROUP_NORMS)
            and user.args[0] is via
            and _single_op_module(an, user)
        ):
            cur = user
        else:
            return cur


def _modules(an: Analysis, root, origins):
    """(preactivation, activation, their unit axes, REPAIR sites) of one group."""
    sites, pre, act, axis_pre, axis_act = [], None, None, None, None
    ends = []
    for node, _ in origins:
        end = _chain_end(an, node)
        module = _single_op_module(an, end)
        if module is not None and module not in sites:
            sites.append(module)
        ends.append((end, module))
    if len(origins) == 1 and ends[0][1] is not None:
        end, pre = ends[0]
        axis_pre = _unit_axis(an, end, root)
        users = _users(end)
        if len(users) == 1 and op_name(users[0][0]) in NONLINEAR and _single_op_module(an, users[0][0]):
            act = _single_op_module(an, users[0][0])
            axis_act = _unit_axis(an, users[0][0], root)
        return pre, act, axis_pre, axis_act, sites
    nonlinear, norms = [], []
    for node in an.graph.nodes:
        if node.op != "call_function" or _single_op_module(an, node) is None:
            continue
        axis = _unit_axis(an, node, root)
        if axis is None:
            continue
        name = op_name(node)
        if name in NONLINEAR:
            nonlinear.append((node, axis))
        elif name in BATCH_NORMS or name in LAYER_NORMS or name in GROUP_NORMS:
            norms.append((node, axis))
    if nonlinear or norms:
        node, axis_act = (nonlinear or norms)[-1]
        act = _single_op_module(an, node)
    elif ends[0][1] is not None:  # tied producers and nothing after them (attention's query and key): the first
        act, axis_act = ends[0][1], _unit_axis(an, ends[0][0], root)
    return None, act, None, axis_act, sites


def attach_permutation_spec(model: nn.Module, spec: PermutationSpec | None = None, **trace_kwargs) -> nn.Module:
    """Give a model without `permutation_spec()` (a transformers ViT, your own module) a traced one,
    so the matchers and `Permutations.apply` accept it. Returns the model (changed in place)."""
    spec = spec if spec is not None else trace_permutation_spec(model, **trace_kwargs)
    model.permutation_spec = lambda: spec
    return model
