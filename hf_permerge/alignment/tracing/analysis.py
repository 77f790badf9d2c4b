"""The label analysis: every axis of every graph value gets a label; labels are merged with union-find
by the op rules (`layer_rules`, `shape_rules`); what the rules cannot follow is blocked, with the reason."""

from __future__ import annotations

import operator

import torch
from torch import nn

from .export import model_path
from .layer_rules import LayerRules
from .ops import OP_FAMILIES, PIN, UnionFind, op_name, shape_of
from .shape_rules import ShapeRules


class Analysis(LayerRules, ShapeRules):
    def __init__(self, ep, model: nn.Module):
        self.ep = ep
        self.uf = UnionFind()
        self.uf.find(PIN)
        self.labels: dict = {}  # node -> tuple of labels per axis | list of those (tuple outputs) | None
        self.blocks: list = []  # (element, reason): an op the rules cannot follow; an error unless skipped
        self.keeps: list = []  # (element, reason, extent): units whose order an op fixes; left in place, never an error
        self.origins: dict = {}  # element -> list of (node, weight key)
        self.param_axes: dict = {}  # element -> (state-dict key, axis, size)
        self.head_splits: list = []  # (label, heads): a group's axis split into (heads, units per head)
        self.head_couplings: list = []  # (query/key label, value label) of one attention op: heads move together
        self.fixed: dict = {}  # element of a tensor outside the state dict -> why it fixes the units it meets
        self.parts: dict = {}  # element -> (label of the split axis, start, width, size of that axis): `part`
        self.scores: dict = {}  # node -> query/key label of the attention scores it holds (None: they differ by head)
        self.conv_groups: list = []  # (label, groups): a grouped convolution's output channels, in fixed groups
        self.graph = ep.graph_module.graph
        self.module_of: dict = {}  # node -> innermost module path
        self.module_calls: dict = {}  # module path -> set of nn_module_stack keys (one per call)
        self.module_nodes: dict = {}  # module path -> compute nodes inside it (any depth)
        self.leaf_modules = {name for name, m in model.named_modules() if name and not any(True for _ in m.children())}
        state_keys = set(model.state_dict(keep_vars=True))
        self.placeholder_key: dict = {}  # placeholder name -> state-dict key | (kind, name) | absent (user input)
        sig = ep.graph_signature
        for spec in sig.input_specs:
            name = getattr(spec.arg, "name", None)
            if spec.kind.name in ("PARAMETER", "BUFFER") and spec.target is not None:
                key = model_path(spec.target)
                self.placeholder_key[name] = key if key in state_keys else ("a non-persistent buffer", key)
            elif spec.kind.name in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
                self.placeholder_key[name] = ("a constant", model_path(str(spec.target)))
        self.user_outputs = [spec.kind.name == "USER_OUTPUT" for spec in sig.output_specs]

    # -- helpers -----------------------------------------------------------------------------------
    def where(self, node) -> str:
        module = self.module_of.get(node)
        return f"node {node.name!r} ({node.target}) in module {module or '<root>'!r}"

    def block(self, label, reason: str) -> None:
        if label is not None:
            self.blocks.append((label, reason))

    def keep(self, label, reason: str, extent: int | None = None) -> None:
        """The units of `label` must keep their order (a rotary embedding pairs them by position, a fused
        projection is split along them): its group stays in place, soundly, with the reason recorded.

        extent: how many consecutive units the op orders, alike for each run of them (the size of the axis it
        sees: one head's units after a head split); None where the op sees the whole group or treats runs
        differently. A group split into heads at least as wide as every extent of its keeps may still move whole
        heads (`PermGroup.rigid`)."""
        if label is not None:
            self.keeps.append((label, reason, extent))

    def fixed_reason(self, label) -> str | None:
        """Why `label`'s units have a fixed order, when its class holds only tensors outside the state dict."""
        root = self.uf.find(label) if label is not None else None
        if root not in self.fixed or any(self.uf.find(e) == root for e in self.param_axes):
            return None
        return self.fixed[root]

    def meet(self, a, b, size: int):
        """The label of an axis where two inputs' labels meet (broadcasting): their union, except that a tensor
        outside the state dict fixes the order of a group's units (`size` of them, alike for every run) instead of
        joining it: rotary frequencies shared by every layer do not tie the layers' heads together."""
        for head, shared in ((a, b), (b, a)):  # a per-head norm's weight (Qwen3's q_norm), one for every head
            if self._shared_by_heads(head, shared, size):
                key = self.param_axes[shared][0]
                self.keep(
                    head,
                    f"{key!r} is one tensor shared by every head, so the units keep their order within each head",
                    size,
                )
                return head
        fa, fb = self.fixed_reason(a), self.fixed_reason(b)
        group = b if fa is not None else a
        if (fa is None) != (fb is None) and self._is_group(group):
            self.keep(group, fa or fb, size)
            return group
        return self.uf.union(a, b)

    def _shared_by_heads(self, head, shared, size: int) -> bool:
        """`shared` is a parameter's axis of one head's width, broadcast over the heads `head` is split into."""
        if head is None or shared not in self.param_axes or self.param_axes[shared][2] != size:
            return False
        root = self.uf.find(head)
        if self.uf.find(shared) == root or not any(self.uf.find(lab) == root for lab, _ in self.head_splits):
            return False
        return any(self.uf.find(e) == root and n > size for e, (_, _, n) in self.param_axes.items())

    def lab(self, x):
        return self.labels.get(x) if isinstance(x, torch.fx.Node) else None

    def pin_all(self, labels) -> None:
        for label in self._flat(labels):
            self.uf.union(PIN, label)

    def block_all(self, labels, reason) -> None:
        for label in self._flat(labels):
            self.block(label, reason)

    def _flat(self, labels):
        if labels is None:
            return []
        if isinstance(labels, list):
            return [lab for part in labels for lab in self._flat(part)]
        return [lab for lab in labels if lab is not None]

    def fresh(self, shape) -> tuple:
        return tuple(None if s == 1 else PIN for s in shape)

    # -- the pass ----------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.graph.nodes:
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                key, (path, _) = list(stack.items())[-1]
                self.module_of[node] = model_path(path)
                if node.op == "call_function" and node.target is not operator.getitem:
                    for k, (p, _) in stack.items():
                        self.module_nodes.setdefault(model_path(p), []).append(node)
                        self.module_calls.setdefault(model_path(p), set()).add(k)
            if node.op == "placeholder":
                self.placeholder(node)
            elif node.op == "call_function":
                self.call(node)
            elif node.op == "output":
                outs = node.args[0]
                for out, is_user in zip(outs, self.user_outputs):
                    if is_user:
                        self.pin_all(self.lab(out))
            elif node.op == "get_attr":
                self.labels[node] = self.fresh(shape_of(node.meta.get("val")) or ())

    def placeholder(self, node) -> None:
        shape = shape_of(node.meta.get("val"))
        if shape is None:
            return
        key = self.placeholder_key.get(node.name)
        if key is None:  # a user input: never permuted
            self.labels[node] = self.fresh(shape)
            return
        labels = []
        for axis, size in enumerate(shape):
            if size == 1:
                labels.append(None)
            elif isinstance(key, str):
                element = ("param", key, axis)
                self.param_axes[element] = (key, axis, size)
                self.uf.find(element)
                labels.append(element)
            else:  # a constant or a non-persistent buffer: not in the state dict
                element = ("fixed", node.name, axis)
                self.fixed[element] = (
                    f"tensor {key[1]!r} is tied to it but is not in the state dict "
                    f"({key[0]}, e.g. a rotary embedding's frequencies), so its units keep their order"
                )
                self.keep(element, self.fixed[element], size)
                labels.append(element)
        self.labels[node] = tuple(labels)

    def call(self, node) -> None:
        name = op_name(node)
        val = node.meta.get("val")
        out_shape = shape_of(val)
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node) and isinstance(self.labels.get(a), tuple)]
        if node.target is operator.getitem:
            src, idx = node.args
            src_labels = self.lab(src)
            self.labels[node] = (
                src_labels[idx]
                if isinstance(src_labels, list) and idx < len(src_labels)
                else (self.fresh(out_shape) if out_shape is not None else None)
            )
            return
        handler = getattr(self, f"op_{name}", None) or next(
            (getattr(self, rule) for names, rule in OP_FAMILIES if name in names), None
        )
        if handler is None and hasattr(node.target, "tags") and torch.Tag.pointwise in node.target.tags:
            handler = self.op_pointwise
        if handler is None:
            reason = f"{name} ({self.where(node)}) is not a permutation-equivariant op this tracer knows"
            for a in tensor_args:
                self.block_all(self.lab(a), reason)
            self.labels[node] = self._fresh_like(val)
            return
        handler(node, val)
        self._follow_scores(node, tensor_args, out_shape)

    def _follow_scores(self, node, tensor_args, out_shape) -> None:
        """Eager attention: scores q k^T keep being scores through elementwise ops of their shape (scaling, the mask,
        a soft cap, softmax, dropout), so the matmul with the values couples the heads (`op_matmul`); a tensor added
        that differs between heads (a relative position bias, ALiBi) pins the heads, as in the fused op."""
        src = [self.scores[a] for a in tensor_args if a in self.scores]
        if not src or node in self.scores or out_shape is None or len(out_shape) < 3:
            return
        if any(shape_of(a.meta.get("val")) != tuple(out_shape) for a in tensor_args if a in self.scores):
            return
        others = [shape_of(a.meta.get("val")) for a in tensor_args if a not in self.scores]
        per_head = any(s is not None and len(s) >= 3 and s[-3] > 1 for s in others)
        self.scores[node] = None if per_head or None in src else src[0]

    def _fresh_like(self, val):
        if isinstance(val, torch.Tensor):
            return self.fresh(shape_of(val))
        if isinstance(val, (tuple, list)):
            return [self._fresh_like(v) for v in val]
        return None

    def _origin(self, label, node, w):
        if label is None:
            return
        key = self.placeholder_key.get(w.name) if w.op == "placeholder" else None
        if isinstance(key, str):
            self.origins.setdefault(label, []).append((node, key))

    def _unknown(self, node, val):
        reason = f"{op_name(node)} ({self.where(node)}) is used in a way this tracer cannot follow"
        for a in node.args:
            if isinstance(a, torch.fx.Node):
                self.block_all(self.lab(a), reason)
        self.labels[node] = self._fresh_like(val)
