"""The aten ops the tracer knows, by family, and the small tools of its label analysis."""

from __future__ import annotations

import torch

PIN = ("pin",)

NONLINEAR = {
    "relu",
    "relu_",
    "gelu",
    "gelu_",
    "silu",
    "silu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "elu",
    "elu_",
    "leaky_relu",
    "leaky_relu_",
    "hardtanh",
    "hardtanh_",
    "hardswish",
    "hardswish_",
    "mish",
    "mish_",
    "softplus",
    "selu",
    "celu",
    "relu6",
    "hardsigmoid",
    "prelu",
    "_prelu_kernel",
    "glu",
}
PASS_THROUGH = {
    "dropout",
    "dropout_",
    "feature_dropout",
    "alpha_dropout",
    "feature_alpha_dropout",
    "contiguous",
    "detach",
    "detach_",
    "alias",
    "_to_copy",
    "to",
    "type_as",
    "lift_fresh_copy",
    "clone",
    "softmax",
    "_softmax",
    "log_softmax",
    "_log_softmax",
    "_assert_tensor_metadata",
}
BATCH_NORMS = {
    "batch_norm",
    "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit",
    "native_batch_norm",
    "_batch_norm_with_update",
    "_batch_norm_no_update",
    "cudnn_batch_norm",
}
LAYER_NORMS = {"layer_norm", "native_layer_norm"}
GROUP_NORMS = {"group_norm", "native_group_norm"}
CONVS = {
    "conv1d",
    "conv2d",
    "conv3d",
    "convolution",
    "_convolution",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
}
RESHAPES = {
    "view",
    "reshape",
    "_unsafe_view",
    "flatten",
    "unflatten",
    "squeeze",
    "squeeze_",
    "unsqueeze",
    "unsqueeze_",
    "view_as",
    "reshape_as",
}
POOLS = {
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "upsample_nearest2d",
    "upsample_bilinear2d",
    "upsample_nearest1d",
    "upsample_nearest3d",
    "lp_pool2d",
}
REDUCTIONS = {
    "mean",
    "sum",
    "amax",
    "amin",
    "max",
    "min",
    "var",
    "std",
    "prod",
    "logsumexp",
    "norm",
    "linalg_vector_norm",
    "var_mean",
    "std_mean",
}
CREATION = {
    "arange",
    "zeros",
    "ones",
    "full",
    "empty",
    "scalar_tensor",
    "zeros_like",
    "ones_like",
    "full_like",
    "empty_like",
    "rand",
    "randn",
    "rand_like",
    "randn_like",
    "tensor",
    "linspace",
    "eye",
}


PADS = {
    "reflection_pad1d",
    "reflection_pad2d",
    "reflection_pad3d",
    "replication_pad1d",
    "replication_pad2d",
    "replication_pad3d",
}

OP_FAMILIES = (
    (CONVS, "op_conv"),
    (BATCH_NORMS, "op_batch_norm"),
    (LAYER_NORMS, "op_layer_norm"),
    (GROUP_NORMS, "op_group_norm"),
    (RESHAPES, "op_reshape"),
    (POOLS, "op_pool"),
    (PADS, "op_pad"),
    (REDUCTIONS, "op_reduction"),
    (CREATION, "op_creation"),
    (PASS_THROUGH | NONLINEAR | {"where"}, "op_pointwise"),  # where(cond, a, b): elementwise, cond broadcast
)
"""Ops without an `op_<name>` rule of their own, by family -> the rule that handles them."""


class UnionFind:
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


def op_name(node) -> str:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


def shape_of(value) -> tuple[int, ...] | None:
    return tuple(int(s) for s in value.shape) if isinstance(value, torch.Tensor) else None
