"""Permutation specs derived from a traced graph, for any `nn.Module` / `PreTrainedModel`.

    from hf_permerge.alignment.tracing import trace_permutation_spec
    spec = trace_permutation_spec(model)     # for our classes: spec.equivalent(model.permutation_spec())
    spec = trace_permutation_spec(vit)       # heads: units permuted within each head

How. The model is traced with `torch.export` (non-strict), which gives a `torch.fx` graph of aten ops
in which every parameter and buffer is a placeholder named by its state-dict key and every op carries
the module path it ran in. (`torch.fx.symbolic_trace` cannot follow transformers' models: their
forwards branch on tensor shapes, e.g. ViT's patch embedding checks the channel count; export traces
with concrete shapes, so Python control flow simply runs.) Then each tensor axis of each graph value
gets a label, and labels are merged with union-find:

- the output axis of every Linear / Conv weight starts a candidate group (an *origin*); its weight's
  input axis is tied to the label of the layer input's feature / channel axis;
- pointwise ops (activations, dropout, additions, multiplications) tie the labels of broadcast axes:
  a residual addition ties its two streams into one group, a parameter added to a stream (ViT's
  position embedding, class token) joins the stream's group;
- BatchNorm / LayerNorm (and GroupNorm with 1 or C groups) parameters and running statistics follow
  their channel's label; pooling, spatial reductions and reshapes that do not touch a labelled axis
  pass labels through (flattening (N, C, 1, 1) to (N, C) keeps C);
- the model's inputs and outputs are pinned: a label tied to them is never permuted (the classifier's
  output, the input pixels);
- a matrix product (and `scaled_dot_product_attention`) ties the axes it contracts: the query and key
  projections' units become one group, the value projection's units (with the output projection's
  inputs) another;
- attention heads: a reshape that splits a group's axis into (heads, units per head) pins the heads
  axis and keeps the group on the units; the reshape that merges them back restores it. Such a group
  gets `PermGroup.blocks` = heads: its permutations keep each head's units together (each head its
  own permutation). An attention op couples its query/key group with its value group
  (`PermutationSpec.couplings`): whole heads move, alike in both; every matcher respects this
  (`hungarian.solve_coupled`). If moving heads breaks the invariance check (a per-head bias, say),
  the couplings are dropped and heads stay in place;
- anything else that touches a candidate group's axis (a reshape that merges it with spatial
  positions or splits it otherwise, a concatenation along it, an index into it, an op this tracer
  does not know) makes
  the group unfollowable: `on_unsupported="error"` (default) raises a ValueError naming the op, its
  node and its module; `"skip"` leaves that group unpermuted and records why in `TracedSpec.skipped`.

Every unpinned, followable origin class becomes a `PermGroup`, named after its first origin module
(state-dict key of the weight without ".weight"). `preactivation`: for a group produced by one layer,
that layer, or the norm that directly follows it (Conv -> BatchNorm: the BatchNorm), as in the
hand-written specs. `activation`: the nonlinearity module applied right after that; for a group tied
by residual additions (several producing layers), no single module carries its pre-activations
(preactivation None) and `activation` is the last nonlinearity module (else the last norm module)
whose output carries the group: the stream's final value (ViT: the final LayerNorm). A module called
more than once (a shared `nn.ReLU`) is never named, since its hook would see several tensors. A name
is None where no module exists (a functional `F.relu`).

The unit axis of a named module's output is 1 for convs and BatchNorm, and the last axis for Linear
and LayerNorm: for a ViT's (N, tokens, units) activations that is not axis 1; `TracedSpec.unit_axes`
records it per group.

`check_permutation_invariance` applies random permutations and checks the model computes the same
function; `trace_permutation_spec` runs it by default, and names the group that breaks it.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Literal

import torch
from torch import nn

from .spec import PermGroup, PermutationSpec, apply_permutations

__all__ = ["TracedSpec", "trace", "trace_permutation_spec", "check_permutation_invariance", "InvarianceError",
           "attach_permutation_spec", "example_inputs_for"]

_PIN = ("pin",)

_NONLINEAR = {"relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "elu",
              "elu_", "leaky_relu", "leaky_relu_", "hardtanh", "hardtanh_", "hardswish", "hardswish_", "mish",
              "mish_", "softplus", "selu", "celu", "relu6", "hardsigmoid", "prelu", "_prelu_kernel", "glu"}
_PASS_THROUGH = {"dropout", "dropout_", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "contiguous",
                 "detach", "detach_", "alias", "_to_copy", "to", "type_as", "lift_fresh_copy", "clone",
                 "softmax", "_softmax", "log_softmax", "_log_softmax", "_assert_tensor_metadata"}
_BATCH_NORMS = {"batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                "native_batch_norm", "_batch_norm_with_update", "_batch_norm_no_update", "cudnn_batch_norm"}
_LAYER_NORMS = {"layer_norm", "native_layer_norm"}
_GROUP_NORMS = {"group_norm", "native_group_norm"}
_CONVS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
          "conv_transpose3d"}
_RESHAPES = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze",
             "unsqueeze_", "view_as", "reshape_as"}
_POOLS = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
          "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
          "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool1d",
          "adaptive_max_pool2d", "adaptive_max_pool3d", "upsample_nearest2d", "upsample_bilinear2d",
          "upsample_nearest1d", "upsample_nearest3d", "lp_pool2d"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "var", "std", "prod", "logsumexp", "norm",
               "linalg_vector_norm", "var_mean", "std_mean"}
_CREATION = {"arange", "zeros", "ones", "full", "empty", "scalar_tensor", "zeros_like", "ones_like", "full_like",
             "empty_like", "rand", "randn", "rand_like", "randn_like", "tensor", "linspace", "eye"}


_OP_FAMILIES = ((_CONVS, "op_conv"), (_BATCH_NORMS, "op_batch_norm"), (_LAYER_NORMS, "op_layer_norm"),
                (_GROUP_NORMS, "op_group_norm"), (_RESHAPES, "op_reshape"), (_POOLS, "op_pool"),
                (_REDUCTIONS, "op_reduction"), (_CREATION, "op_creation"),
                (_PASS_THROUGH | _NONLINEAR, "op_pointwise"))
"""Ops without an `op_<name>` rule of their own, by family -> the rule that handles them."""


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


# --------------------------------------------------------------------------------------------------
# Inputs and the traced call
# --------------------------------------------------------------------------------------------------
def example_inputs_for(model: nn.Module, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pixels shaped by the model's config (`num_channels`, `image_size`), keyed by its main input name."""
    from .matchers import input_shape

    shape = input_shape(model)
    if shape is None or None in shape:
        raise ValueError(f"cannot guess example inputs for {type(model).__name__} (its config has no num_channels / "
                         "image_size); pass example_inputs=<a tensor, a tuple of positional args or a dict of kwargs>")
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else "cpu"
    x = torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    return {getattr(model, "main_input_name", "pixel_values"): x}


def _as_call(model: nn.Module, example_inputs) -> tuple[tuple, dict]:
    if example_inputs is None:
        return (), example_inputs_for(model)
    if isinstance(example_inputs, torch.Tensor):
        name = getattr(model, "main_input_name", None)
        return ((), {name: example_inputs}) if name else ((example_inputs,), {})
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(f"example_inputs must be a tensor, a tuple of positional args or a dict of kwargs, "
                    f"got {type(example_inputs).__name__}")


def _tensors(out) -> list[torch.Tensor]:
    """Every tensor in a model output (a tensor, tuple, list, dict or transformers ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # ModelOutput is an OrderedDict of its non-None fields
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


class _Call(nn.Module):
    """`model(*args, **kwargs)` with tensor kwargs passed positionally, returning the output's tensors."""

    def __init__(self, model: nn.Module, num_args: int, kw_names: tuple[str, ...], static: dict):
        super().__init__()
        self.model = model
        self.num_args, self.kw_names, self.static = num_args, kw_names, static

    def forward(self, *inputs):
        kwargs = dict(zip(self.kw_names, inputs[self.num_args:]), **self.static)
        return tuple(_tensors(self.model(*inputs[:self.num_args], **kwargs)))


def _callable(model: nn.Module, example_inputs) -> tuple[_Call, tuple]:
    args, kwargs = _as_call(model, example_inputs)
    tensor_kw = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    static = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    return _Call(model, len(args), tuple(tensor_kw), static), (*args, *tensor_kw.values())


def _strip(path: str) -> str:
    """Paths inside the `_Call` wrapper start with 'model.'; the model's own names do not."""
    return path[len("model."):] if path.startswith("model.") else "" if path == "model" else path


# --------------------------------------------------------------------------------------------------
# The label analysis
# --------------------------------------------------------------------------------------------------
class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a, b):
        if a is None or b is None:
            return a if b is None else b
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        return ra


def _op_name(node) -> str:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


def _shape(value) -> tuple[int, ...] | None:
    return tuple(int(s) for s in value.shape) if isinstance(value, torch.Tensor) else None


class _Analysis:
    def __init__(self, ep, model: nn.Module):
        self.ep = ep
        self.uf = _UnionFind()
        self.uf.find(_PIN)
        self.labels: dict = {}          # node -> tuple of labels per axis | list of those (tuple outputs) | None
        self.blocks: list = []          # (element, reason)
        self.origins: dict = {}         # element -> list of (node, weight key)
        self.param_axes: dict = {}      # element -> (state-dict key, axis, size)
        self.head_splits: list = []     # (label, heads): a group's axis split into (heads, units per head)
        self.head_couplings: list = []  # (query/key label, value label) of one attention op: heads move together
        self.graph = ep.graph_module.graph
        self.module_of: dict = {}       # node -> innermost module path
        self.module_calls: dict = {}    # module path -> set of nn_module_stack keys (one per call)
        self.module_nodes: dict = {}    # module path -> compute nodes inside it (any depth)
        state_keys = set(model.state_dict(keep_vars=True))
        self.placeholder_key: dict = {}   # placeholder name -> state-dict key | (kind, name) | absent (user input)
        sig = ep.graph_signature
        for spec in sig.input_specs:
            name = getattr(spec.arg, "name", None)
            if spec.kind.name in ("PARAMETER", "BUFFER") and spec.target is not None:
                key = _strip(spec.target)
                self.placeholder_key[name] = key if key in state_keys else ("a non-persistent buffer", key)
            elif spec.kind.name in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
                self.placeholder_key[name] = ("a constant", _strip(str(spec.target)))
        self.user_outputs = [spec.kind.name == "USER_OUTPUT" for spec in sig.output_specs]

    # -- helpers -----------------------------------------------------------------------------------
    def where(self, node) -> str:
        module = self.module_of.get(node)
        return f"node {node.name!r} ({node.target}) in module {module or '<root>'!r}"

    def block(self, label, reason: str) -> None:
        if label is not None:
            self.blocks.append((label, reason))

    def lab(self, x):
        return self.labels.get(x) if isinstance(x, torch.fx.Node) else None

    def pin_all(self, labels) -> None:
        for label in self._flat(labels):
            self.uf.union(_PIN, label)

    def block_all(self, labels, reason) -> None:
        for label in self._flat(labels):
            self.block(label, reason)

    def _flat(self, labels):
        if labels is None:
            return []
        if isinstance(labels, list):
            return [l for part in labels for l in self._flat(part)]
        return [l for l in labels if l is not None]

    def fresh(self, shape) -> tuple:
        return tuple(None if s == 1 else _PIN for s in shape)

    # -- the pass ----------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.graph.nodes:
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                key, (path, _) = list(stack.items())[-1]
                self.module_of[node] = _strip(path)
                if node.op == "call_function" and node.target is not operator.getitem:
                    for k, (p, _) in stack.items():
                        self.module_nodes.setdefault(_strip(p), []).append(node)
                        self.module_calls.setdefault(_strip(p), set()).add(k)
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
                self.labels[node] = self.fresh(_shape(node.meta.get("val")) or ())

    def placeholder(self, node) -> None:
        shape = _shape(node.meta.get("val"))
        if shape is None:
            return
        key = self.placeholder_key.get(node.name)
        if key is None:                       # a user input: never permuted
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
            else:                             # a constant or a non-persistent buffer: not in the state dict
                element = ("fixed", node.name, axis)
                self.block(element, f"tensor {key[1]!r} is tied to it but is not in the state dict "
                                    f"({key[0]}), so it cannot be permuted")
                labels.append(element)
        self.labels[node] = tuple(labels)

    def call(self, node) -> None:
        name = _op_name(node)
        val = node.meta.get("val")
        out_shape = _shape(val)
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node) and isinstance(self.labels.get(a), tuple)]
        if node.target is operator.getitem:
            src, idx = node.args
            src_labels = self.lab(src)
            self.labels[node] = src_labels[idx] if isinstance(src_labels, list) and idx < len(src_labels) else (
                self.fresh(out_shape) if out_shape is not None else None)
            return
        handler = getattr(self, f"op_{name}", None) or next(
            (getattr(self, rule) for names, rule in _OP_FAMILIES if name in names), None)
        if handler is None and hasattr(node.target, "tags") and torch.Tag.pointwise in node.target.tags:
            handler = self.op_pointwise
        if handler is None:
            reason = f"{name} ({self.where(node)}) is not a permutation-equivariant op this tracer knows"
            for a in tensor_args:
                self.block_all(self.lab(a), reason)
            self.labels[node] = self._fresh_like(val)
            return
        handler(node, val)

    def _fresh_like(self, val):
        if isinstance(val, torch.Tensor):
            return self.fresh(_shape(val))
        if isinstance(val, (tuple, list)):
            return [self._fresh_like(v) for v in val]
        return None

    # -- op rules ----------------------------------------------------------------------------------
    def op_linear(self, node, val):
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        xl, wl = self.lab(x), self.lab(w)
        if wl is None or len(wl) != 2:
            return self._unknown(node, val)
        self.uf.union(wl[1], xl[-1] if xl else None)
        if isinstance(b, torch.fx.Node) and self.lab(b):
            self.uf.union(wl[0], self.lab(b)[0])
        self._origin(wl[0], node, w)
        self.labels[node] = tuple(xl[:-1]) + (wl[0],) if xl else self.fresh(_shape(val))

    def op_conv(self, node, val):
        name = _op_name(node)
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        xl, wl = self.lab(x), self.lab(w)
        if name in ("convolution", "_convolution"):
            # (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
            transposed, groups = bool(node.args[6]), int(node.args[8])
        else:                                          # convNd / conv_transposeNd: groups is argument 6
            transposed = name.startswith("conv_transpose")
            groups = int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))
        if xl is None or wl is None:
            return self._unknown(node, val)
        out_axis, in_axis = (1, 0) if transposed else (0, 1)
        where = self.where(node)
        for label in xl[2:]:
            self.block(label, f"{name} ({where}) mixes a spatial axis that carries the group")
        out_label = wl[out_axis]
        if groups == 1:
            self.uf.union(wl[in_axis], xl[1])
        elif not transposed and w.meta["val"].shape[1] == 1 and _shape(x.meta["val"])[1] == groups \
                and _shape(val)[1] == groups:
            out_label = self.uf.union(out_label, xl[1])          # depthwise: each channel on its own
        else:
            self.block(xl[1], f"{name} with {groups} groups ({where}) mixes channels within groups")
            self.block(out_label, f"{name} with {groups} groups ({where}) mixes channels within groups")
        if isinstance(b, torch.fx.Node) and self.lab(b):
            self.uf.union(out_label, self.lab(b)[0])
        self._origin(out_label, node, w)
        out = self.fresh(_shape(val))
        self.labels[node] = (xl[0], out_label) + out[2:]

    def _origin(self, label, node, w):
        if label is None:
            return
        key = self.placeholder_key.get(w.name) if w.op == "placeholder" else None
        if isinstance(key, str):
            self.origins.setdefault(label, []).append((node, key))

    def op_batch_norm(self, node, val):
        x = node.args[0]
        xl = self.lab(x)
        if xl is None or len(xl) < 2:
            return self._unknown(node, val)
        for p in node.args[1:5]:
            if isinstance(p, torch.fx.Node) and self.lab(p):
                self.uf.union(xl[1], self.lab(p)[0])
        if isinstance(val, (tuple, list)):
            self.labels[node] = [tuple(xl)] + [(xl[1],) if _shape(v) and len(_shape(v)) == 1 else self._fresh_like(v)
                                               for v in val[1:]]
        else:
            self.labels[node] = tuple(xl)

    def op_layer_norm(self, node, val):
        x, normalized = node.args[0], node.args[1]
        xl = self.lab(x)
        if xl is None:
            return self._unknown(node, val)
        k = len(normalized)
        for p in node.args[2:4]:
            if isinstance(p, torch.fx.Node) and self.lab(p):
                for i, label in enumerate(self.lab(p)):
                    self.uf.union(xl[len(xl) - k + i], label)
        out = tuple(xl)
        self.labels[node] = [out] + [self._fresh_like(v) for v in val[1:]] if isinstance(val, (tuple, list)) else out

    def op_group_norm(self, node, val):
        name = _op_name(node)
        x = node.args[0]
        xl = self.lab(x)
        if name == "group_norm":
            groups, params = int(node.args[1]), node.args[2:4]
        else:                                   # native_group_norm(input, weight, bias, N, C, HxW, group, eps)
            groups, params = int(node.args[6]), node.args[1:3]
        channels = _shape(x.meta["val"])[1]
        if groups not in (1, channels):
            self.block(xl[1], f"{name} with {groups} groups of {channels} channels ({self.where(node)}) "
                              "normalises channels in fixed groups")
        for p in params:
            if isinstance(p, torch.fx.Node) and self.lab(p):
                self.uf.union(xl[1], self.lab(p)[0])
        out = tuple(xl)
        self.labels[node] = [out] + [self._fresh_like(v) for v in val[1:]] if isinstance(val, (tuple, list)) else out

    def op_pointwise(self, node, val):
        """Broadcasting: axes aligned from the right; every input axis of size > 1 ties with the output axis."""
        if not isinstance(val, torch.Tensor):
            if isinstance(val, (tuple, list)) and val and isinstance(val[0], torch.Tensor):  # native_dropout
                x = node.args[0]
                self.labels[node] = [tuple(self.lab(x))] + [tuple(self.lab(x)) if _shape(v) == _shape(val[0])
                                                            else self._fresh_like(v) for v in val[1:]]
                return
            self.labels[node] = None
            return
        shape = _shape(val)
        out = [None] * len(shape)
        for a in list(node.args) + list(node.kwargs.values()):
            if not isinstance(a, torch.fx.Node):
                continue
            al = self.lab(a)
            if not isinstance(al, tuple):
                continue
            offset = len(shape) - len(al)
            for i, label in enumerate(al):
                if label is not None and i + offset >= 0:
                    out[i + offset] = self.uf.union(out[i + offset], label)
        self.labels[node] = tuple(label if label is not None or s == 1 else _PIN for label, s in zip(out, shape))

    def op_reshape(self, node, val):
        x = node.args[0]
        xl = self.lab(x)
        in_shape, out_shape = _shape(x.meta["val"]), _shape(val)
        src = [(i, s) for i, s in enumerate(in_shape) if s != 1]
        dst = [(j, s) for j, s in enumerate(out_shape) if s != 1]
        out = [None] * len(out_shape)
        i = j = 0
        while i < len(src) and j < len(dst):
            ia, oa = [src[i]], [dst[j]]
            pi, po = src[i][1], dst[j][1]
            i, j = i + 1, j + 1
            while pi != po:
                if pi < po and i < len(src):
                    ia.append(src[i]); pi *= src[i][1]; i += 1   # noqa: E702
                elif j < len(dst):
                    oa.append(dst[j]); po *= dst[j][1]; j += 1   # noqa: E702
                else:
                    break
            if len(ia) == 1 and len(oa) == 1:
                out[oa[0][0]] = xl[ia[0][0]]
                continue
            if self._heads(xl, ia, oa, out):
                continue
            sizes_in, sizes_out = [s for _, s in ia], [s for _, s in oa]
            for axis, size in ia:
                what = (f"splits an axis of size {size} into {sizes_out} (as attention heads do)" if len(ia) == 1 else
                        f"merges an axis of size {size} with others into one (sizes {sizes_in} -> {sizes_out}; as a "
                        "flatten of conv channels with spatial positions before a Linear does)")
                self.block(xl[axis], f"{_op_name(node)} ({self.where(node)}) {what}")
            for axis, _ in oa:
                out[axis] = _PIN
        self.labels[node] = tuple(out)

    def _is_group(self, label) -> bool:
        return label is not None and self.uf.find(label) != self.uf.find(_PIN)

    def _heads(self, xl, ia, oa, out) -> bool:
        """Attention heads: a group's axis split into (heads, units per head), or merged back from them.

        The split keeps the group on the units-per-head axis and pins the heads axis; the group's
        permutations then keep each head's units together (`PermGroup.blocks` = heads), and whole heads
        move only as an attention op's coupling says. Only that merge (heads pinned, major; a split
        group's units minor) is undone; any other merge still blocks the group."""
        if len(ia) == 1 and len(oa) == 2 and self._is_group(xl[ia[0][0]]):
            (head_axis, heads), (unit_axis, _) = oa
            label = xl[ia[0][0]]
            self.head_splits.append((label, heads))
            out[head_axis], out[unit_axis] = _PIN, label
            return True
        if len(ia) == 2 and len(oa) == 1:
            (head_axis, heads), (unit_axis, _) = ia
            label = xl[unit_axis]
            split = any(h == heads and self.uf.find(l) == self.uf.find(label) for l, h in self.head_splits)
            if split and self._is_group(label) and not self._is_group(xl[head_axis]):
                out[oa[0][0]] = label
                return True
        return False

    def op_scaled_dot_product_attention(self, node, val):
        """softmax(q k^T / sqrt(d)) v over (..., heads, tokens, units): q's and k's units are contracted
        (one group), v's units pass to the output; the leading axes broadcast."""
        ql, kl, vl = (self.lab(a) for a in node.args[:3])
        if not all(isinstance(l, tuple) and len(l) >= 2 for l in (ql, kl, vl)):
            return self._unknown(node, val)
        self.uf.union(ql[-1], kl[-1])
        self.uf.union(kl[-2], vl[-2])
        self.head_couplings.append((ql[-1], vl[-1]))
        out = list(ql[:-1]) + [vl[-1]]
        for i in range(len(out) - 2):
            out[i] = self.uf.union(self.uf.union(out[i], kl[i] if i < len(kl) else None), vl[i] if i < len(vl) else None)
        self.labels[node] = tuple(out)

    def op_matmul(self, node, val):
        """a @ b: the contracted axes (a's last, b's second to last) are one group; batch axes broadcast."""
        al, bl = self.lab(node.args[0]), self.lab(node.args[1])
        if not isinstance(al, tuple) or not isinstance(bl, tuple) or len(al) < 2 or len(bl) < 2:
            return self._unknown(node, val)
        self.uf.union(al[-1], bl[-2])
        shape = _shape(val)
        out = [None] * len(shape)
        for batch in (al[:-2], bl[:-2]):
            offset = len(shape) - 2 - len(batch)
            for i, label in enumerate(batch):
                out[offset + i] = self.uf.union(out[offset + i], label)
        out[-2], out[-1] = al[-2], bl[-1]
        self.labels[node] = tuple(label if label is not None or s == 1 else _PIN for label, s in zip(out, shape))

    op_mm = op_bmm = op_matmul

    def op_transpose(self, node, val):
        xl = list(self.lab(node.args[0]))
        d0, d1 = (int(d) % len(xl) for d in node.args[1:3])
        xl[d0], xl[d1] = xl[d1], xl[d0]
        self.labels[node] = tuple(xl)

    op_swapaxes = op_transpose

    def op_t(self, node, val):
        self.labels[node] = tuple(reversed(self.lab(node.args[0])))

    def op_permute(self, node, val):
        xl = self.lab(node.args[0])
        self.labels[node] = tuple(xl[int(d) % len(xl)] for d in node.args[1])

    def op_expand(self, node, val):
        xl = self.lab(node.args[0])
        shape = _shape(val)
        offset = len(shape) - len(xl)
        out = list(self.fresh(shape[:offset]))
        for i, label in enumerate(xl):
            s = shape[offset + i]
            out.append(label if label is not None else (None if s == 1 else _PIN))
        self.labels[node] = tuple(out)

    def op_expand_as(self, node, val):
        self.op_expand(node, val)

    def op_cat(self, node, val):
        tensors = node.args[0]
        dim = int(node.args[1]) if len(node.args) > 1 else int(node.kwargs.get("dim", 0))
        shape = _shape(val)
        dim %= len(shape)
        out = [None] * len(shape)
        for t in tensors:
            tl = self.lab(t)
            for i, label in enumerate(tl):
                if i == dim:
                    self.block(label, f"cat ({self.where(node)}) concatenates along a group's axis")
                else:
                    out[i] = self.uf.union(out[i], label)
        out[dim] = None if shape[dim] == 1 else _PIN
        self.labels[node] = tuple(label if label is not None or s == 1 else _PIN for label, s in zip(out, shape))

    def op_stack(self, node, val):
        tensors = node.args[0]
        dim = int(node.args[1]) if len(node.args) > 1 else 0
        shape = _shape(val)
        dim %= len(shape)
        rest = [None] * (len(shape) - 1)
        for t in tensors:
            for i, label in enumerate(self.lab(t)):
                rest[i] = self.uf.union(rest[i], label)
        out = rest[:dim] + [None if shape[dim] == 1 else _PIN] + rest[dim:]
        self.labels[node] = tuple(out)

    def op_select(self, node, val):
        xl = list(self.lab(node.args[0]))
        dim = int(node.args[1]) % len(xl)
        self.block(xl[dim], f"select ({self.where(node)}) picks one unit of a group")
        del xl[dim]
        self.labels[node] = tuple(xl)

    def op_slice(self, node, val):
        x = node.args[0]
        xl = list(self.lab(x))
        dim = int(node.args[1]) % len(xl) if len(node.args) > 1 else 0
        if _shape(x.meta["val"])[dim] != _shape(val)[dim]:
            self.block(xl[dim], f"slice ({self.where(node)}) takes part of a group's units")
            xl[dim] = None if _shape(val)[dim] == 1 else _PIN
        self.labels[node] = tuple(xl)

    def op_pool(self, node, val):
        xl = self.lab(node.args[0])
        where = self.where(node)
        for label in xl[2:]:
            self.block(label, f"{_op_name(node)} ({where}) pools over a group's axis")
        outs = val if isinstance(val, (tuple, list)) else [val]
        labels = [tuple(xl[:2]) + self.fresh(_shape(v))[2:] for v in outs]
        self.labels[node] = labels if isinstance(val, (tuple, list)) else labels[0]

    def op_reduction(self, node, val):
        x = node.args[0]
        xl = self.lab(x)
        ndim = len(xl)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = list(range(ndim))
        elif isinstance(dims, int):
            dims = [dims]
        if not all(isinstance(d, int) for d in dims):
            return self._unknown(node, val)
        dims = {d % ndim for d in dims}
        for d in dims:
            self.block(xl[d], f"{_op_name(node)} ({self.where(node)}) reduces over a group's axis")
        kept = [label if i not in dims else None for i, label in enumerate(xl)]
        outs = val if isinstance(val, (tuple, list)) else [val]
        labels = []
        for v in outs:
            shape = _shape(v)
            if shape is None:
                labels.append(None)
            elif len(shape) == ndim:
                labels.append(tuple(kept))
            else:
                labels.append(tuple(label for i, label in enumerate(kept) if i not in dims))
        self.labels[node] = labels if isinstance(val, (tuple, list)) else labels[0]

    def op_creation(self, node, val):
        self.labels[node] = self._fresh_like(val)

    def _unknown(self, node, val):
        reason = f"{_op_name(node)} ({self.where(node)}) is used in a way this tracer cannot follow"
        for a in node.args:
            if isinstance(a, torch.fx.Node):
                self.block_all(self.lab(a), reason)
        self.labels[node] = self._fresh_like(val)


# --------------------------------------------------------------------------------------------------
# From labels to a spec
# --------------------------------------------------------------------------------------------------
def trace(model: nn.Module, example_inputs=None, on_unsupported: Literal["error", "skip"] = "error",
          check: bool = True) -> TracedSpec:
    """Trace `model` and derive its permutation spec; see the module docstring for the rules.

    example_inputs: a tensor (the model's main input), a tuple of positional args or a dict of kwargs;
    by default random pixels shaped by `model.config`. check: verify on those inputs that randomly
    permuting every group leaves the outputs unchanged (raises naming the group that breaks it).
    """
    if on_unsupported not in ("error", "skip"):
        raise ValueError(f"on_unsupported={on_unsupported!r}; choose 'error' or 'skip'")
    call, inputs = _callable(model, example_inputs)
    was_training = model.training
    model.eval()     # BatchNorm as used for inference (no running-stat updates), dropout off
    try:
        with torch.no_grad():
            ep = torch.export.export(call, inputs, strict=False)
    except Exception as err:  # export's own errors are long; keep them, say what failed
        raise ValueError(f"cannot trace {type(model).__name__} with torch.export: {type(err).__name__}: {err}") from err
    finally:
        model.train(was_training)
    analysis = _Analysis(ep, model)
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
        except InvarianceError as err:      # a group the rules followed wrongly: refuse it like any other
            reason = ("randomly permuting it changes the model's outputs (an op uses its units in a way the "
                      "tracer's rules do not capture, e.g. attention heads split with the heads as the minor axis)")
            if on_unsupported == "error":
                raise ValueError(f"cannot derive a permutation spec for {type(model).__name__}: the units of "
                                 f"{err.groups} cannot be permuted: {reason}. Pass on_unsupported='skip' to leave "
                                 "such groups unpermuted.") from err
            kept = tuple(g for g in result.spec.groups if g.name not in err.groups)
            couplings = tuple(c for c in result.spec.couplings if not set(c) & set(err.groups))
            result = dataclasses.replace(
                result, spec=PermutationSpec(kept, couplings), skipped={**result.skipped, **{g: reason for g in err.groups}},
                unit_axes={g: a for g, a in result.unit_axes.items() if g not in err.groups})
            if kept:
                check_permutation_invariance(model, result.spec, example_inputs)
    return result


def trace_permutation_spec(model: nn.Module, example_inputs=None,
                           on_unsupported: Literal["error", "skip"] = "error", check: bool = True) -> PermutationSpec:
    """The `PermutationSpec` of any module, derived from its traced graph (see `trace`).

    Groups are named after the first module that writes their units (`layers.0`), so a hand-written spec
    with other names is compared by `spec.equivalent(model.permutation_spec())`, not by `==`.
    """
    return trace(model, example_inputs, on_unsupported, check).spec


def _build(an: _Analysis, model: nn.Module, on_unsupported: str) -> TracedSpec:
    uf = an.uf
    pinned = uf.find(_PIN)
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
        axes = sorted({(alias, an.param_axes[e][1]) for e in elems if e in an.param_axes
                       for alias in aliases.get(an.param_axes[e][0], [an.param_axes[e][0]])},
                      key=lambda ka: (position[ka[0]], ka[1]))
        reason = blocked.get(root)
        keys = [k for k, _ in axes]
        if reason is None and len(set(keys)) != len(keys):
            twice = sorted({k for k in keys if keys.count(k) > 1})
            reason = (f"the group would permute two axes of {twice[0]!r} (its input and output are tied, e.g. by a "
                      "residual connection around a single layer); the spec allows one axis per tensor")
        if reason is not None:
            if on_unsupported == "error":
                raise ValueError(f"cannot derive a permutation spec for {type(model).__name__}: the units produced by "
                                 f"{name!r} cannot be permuted: {reason}. Pass on_unsupported='skip' to leave such "
                                 "groups unpermuted.")
            skipped[name] = reason
            continue
        size = an.param_axes[next(e for e in elems if e in an.param_axes)][2]
        heads = {h for l, h in an.head_splits if uf.find(l) == root}
        if len(heads) > 1 and on_unsupported == "error":
            raise ValueError(f"cannot derive a permutation spec for {type(model).__name__}: the units produced by "
                             f"{name!r} are split into {sorted(heads)} heads in different places")
        if len(heads) > 1:
            skipped[name] = f"its units are split into {sorted(heads)} heads in different places"
            continue
        blocks = heads.pop() if heads else 1
        pre, act, axis_pre, axis_act, sites = _modules(an, root, origins)
        if blocks == 1:      # attention projections are not REPAIRed: their outputs are logits' factors
            repair_modules += sites
        axis = axis_act if act is not None else axis_pre
        if pre is not None and act is not None and axis_pre != axis_act:
            pre = None     # one unit axis per group: keep the one activation matching uses by default
        groups.append(PermGroup(name, size, tuple(axes), activation=act or pre, preactivation=pre,
                                unit_axis=axis if axis is not None else 1, blocks=blocks))
        unit_axes[name] = {k: v for k, v in (("activation", axis_act), ("preactivation", axis_pre)) if v is not None}
    name_of = {root: origins[0][1].rsplit(".", 1)[0] for _, root, _, origins in classes}
    built = {g.name: g for g in groups}
    couplings = []
    for qk, v in an.head_couplings:
        pair = tuple(dict.fromkeys(name_of.get(uf.find(l)) for l in (qk, v)))
        if len(pair) == 2 and all(n in built and built[n].blocks > 1 for n in pair) and \
                built[pair[0]].blocks == built[pair[1]].blocks and pair not in couplings:
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


def _single_op_module(an: _Analysis, node) -> str | None:
    """The module whose whole forward is this one op (and is called once): its output is the node's output."""
    path = an.module_of.get(node)
    if not path or len(an.module_calls.get(path, ())) != 1:
        return None
    if an.module_nodes.get(path) != [node]:
        return None
    return path


def _unit_axis(an: _Analysis, node, root) -> int | None:
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


def _chain_end(an: _Analysis, origin_node):
    """Follow a producing layer through norms that only it feeds: the per-unit affine output REPAIR corrects."""
    cur = origin_node
    while True:
        users = _users(cur)
        if len(users) != 1:
            return cur
        user, via = users[0]
        name = _op_name(user) if user.op == "call_function" else ""
        if (name in _BATCH_NORMS or name in _LAYER_NORMS or name in _GROUP_NORMS) and user.args[0] is via \
                and _single_op_module(an, user):
            cur = user
        else:
            return cur


def _modules(an: _Analysis, root, origins):
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
        if len(users) == 1 and _op_name(users[0][0]) in _NONLINEAR and _single_op_module(an, users[0][0]):
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
        name = _op_name(node)
        if name in _NONLINEAR:
            nonlinear.append((node, axis))
        elif name in _BATCH_NORMS or name in _LAYER_NORMS or name in _GROUP_NORMS:
            norms.append((node, axis))
    if nonlinear or norms:
        node, axis_act = (nonlinear or norms)[-1]
        act = _single_op_module(an, node)
    elif ends[0][1] is not None:     # tied producers and nothing after them (attention's query and key): the first
        act, axis_act = ends[0][1], _unit_axis(an, ends[0][0], root)
    return None, act, None, axis_act, sites


# --------------------------------------------------------------------------------------------------
# Checks and glue
# --------------------------------------------------------------------------------------------------
class InvarianceError(AssertionError):
    """A permutation spec under which the model's outputs change; `groups` names the groups that break it."""

    def __init__(self, message: str, groups: list[str]):
        super().__init__(message)
        self.groups = groups


@torch.no_grad()
def check_permutation_invariance(model: nn.Module, spec: PermutationSpec, example_inputs=None, seed: int = 0,
                                 rtol: float = 1e-4) -> None:
    """Raise AssertionError unless randomly permuting every group leaves the model's outputs unchanged
    (eval mode, on `example_inputs`); on failure, the message names the groups that break it."""
    from torch.func import functional_call

    from .permutations import Permutations

    call, inputs = _callable(model, example_inputs)
    state = dict(model.state_dict())
    was_training = model.training
    model.eval()
    try:
        reference = call(*inputs)

        def differs(perms) -> float:
            out = functional_call(call, {f"model.{k}": v for k, v in apply_permutations(spec, state, perms).items()},
                                  inputs)
            worst = 0.0
            for a, b in zip(reference, out):
                scale = a.abs().max().item() if a.numel() else 0.0
                worst = max(worst, (a - b).abs().max().item() / max(scale, 1e-6) if a.numel() else 0.0)
            return worst

        perms = Permutations.random(spec, seed)
        if differs(perms) <= rtol:
            return
        bad = [g.name for g in spec.groups
               if differs(Permutations({g.name: perms[g.name]})) > rtol]
    finally:
        model.train(was_training)
    raise InvarianceError(f"permuting group(s) {bad or spec.names} of {type(model).__name__} changes its outputs: "
                          "the permutation spec is wrong for this model", bad or spec.names)


def attach_permutation_spec(model: nn.Module, spec: PermutationSpec | None = None, **trace_kwargs) -> nn.Module:
    """Give a model without `permutation_spec()` (a transformers ViT, your own module) a traced one,
    so the matchers and `Permutations.apply` accept it. Returns the model (changed in place)."""
    spec = spec if spec is not None else trace_permutation_spec(model, **trace_kwargs)
    model.permutation_spec = lambda: spec
    return model
