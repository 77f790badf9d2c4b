"""Which modules carry a group's units: its producing layer (or the norm right after it), the activation module
after that, their unit axes, and the sites REPAIR corrects."""

from __future__ import annotations

import operator

import torch

from .analysis import Analysis
from .ops import BATCH_NORMS, GROUP_NORMS, LAYER_NORMS, NONLINEAR, PASS_THROUGH, op_name


def _single_op_module(an: Analysis, node) -> str | None:
    """The leaf module (no submodules, called once) whose output is this node: its last op. A Linear, a norm, an
    activation module of several pointwise ops (GPT-2's GELU), GPT-2's `Conv1D` (view, addmm, view), an RMSNorm."""
    path = an.module_of.get(node)
    if not path or len(an.module_calls.get(path, ())) != 1 or path not in an.leaf_modules:
        return None
    nodes = an.module_nodes.get(path) or []
    if not nodes or nodes[-1] is not node:
        return None
    return path


def _module_output(an: Analysis, node):
    """From an op inside a leaf module to that module's output, through the single-user ops that follow it there
    (Conv1D's addmm -> view); the node itself where it is not inside a leaf module."""
    path = an.module_of.get(node)
    while path in an.leaf_modules and _single_op_module(an, node) is None:
        users = [u for u, _ in _users(node)]
        if len(users) != 1 or an.module_of.get(users[0]) != path:
            return node
        node = users[0]
    return node


def _is_norm_module(an: Analysis, path: str) -> bool:
    names = {op_name(n) for n in an.module_nodes.get(path, [])}
    return bool(names & (BATCH_NORMS | LAYER_NORMS | GROUP_NORMS)) or {"rsqrt", "mean"} <= names  # RMSNorm


def _is_pointwise_module(an: Analysis, path: str) -> bool:
    """Every op of the module is elementwise (an activation written as several ops, GPT-2's `NewGELUActivation`)."""
    return all(
        op_name(n) in NONLINEAR | PASS_THROUGH or torch.Tag.pointwise in getattr(n.target, "tags", ())
        for n in an.module_nodes.get(path, [])
    )


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
    cur = _module_output(an, origin_node)
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


def _activation_after(an: Analysis, end, root):
    """(module, unit axis) of the activation module that alone consumes `end`, or (None, None)."""
    users = [u for u, _ in _users(end)]
    paths = {an.module_of.get(u) for u in users}
    if len(paths) != 1:
        return None, None
    path = paths.pop()
    if path is None or path == an.module_of.get(end) or not _is_pointwise_module(an, path):
        return None, None
    nodes = an.module_nodes.get(path) or []
    if not nodes or _single_op_module(an, nodes[-1]) is None:
        return None, None
    if not any(op_name(n) in NONLINEAR for n in nodes) and not any(op_name(n) == "tanh" for n in nodes):
        return None, None
    axis = _unit_axis(an, nodes[-1], root)
    return (path, axis) if axis is not None else (None, None)


def group_modules(an: Analysis, root, origins):
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
        act, axis_act = _activation_after(an, end, root)
        return pre, act, axis_pre, axis_act, sites
    nonlinear, norms = [], []
    for node in an.graph.nodes:
        if node.op != "call_function":
            continue
        path = _single_op_module(an, node)
        if path is None:
            continue
        axis = _unit_axis(an, node, root)
        if axis is None:
            continue
        name = op_name(node)
        if name in NONLINEAR and len(an.module_nodes.get(path, [])) == 1:
            nonlinear.append((node, axis))
        elif _is_norm_module(an, path):
            norms.append((node, axis))
    if nonlinear or norms:
        node, axis_act = (nonlinear or norms)[-1]
        act = _single_op_module(an, node)
    elif ends[0][1] is not None:  # tied producers and nothing after them (attention's query and key): the first
        act, axis_act = ends[0][1], _unit_axis(an, ends[0][0], root)
    return None, act, None, axis_act, sites
