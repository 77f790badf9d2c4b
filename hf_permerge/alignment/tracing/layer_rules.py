"""Op rules for layers: Linear and convolutions start groups; norms and pointwise ops carry them."""

from __future__ import annotations

import torch

from .ops import PIN, op_name, shape_of


class LayerRules:
    """`op_<name>` rules of `Analysis` for layers (a mixin: the state is the analysis')."""

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
        self.labels[node] = tuple(xl[:-1]) + (wl[0],) if xl else self.fresh(shape_of(val))

    def op_addmm(self, node, val):
        """addmm(bias, x, w) = bias + x @ w with w stored (in, out): GPT-2's `Conv1D`."""
        b, x, w = node.args[:3]
        xl, wl = self.lab(x), self.lab(w)
        if xl is None or wl is None or len(wl) != 2 or len(xl) != 2:
            return self._unknown(node, val)
        self.uf.union(wl[0], xl[-1])
        if isinstance(b, torch.fx.Node) and self.lab(b):
            self.uf.union(wl[1], self.lab(b)[-1])
        self._origin(wl[1], node, w)
        self.labels[node] = (xl[0], wl[1])

    def op_embedding(self, node, val):
        """embedding(weight, indices): each index picks a row, so the rows (the vocabulary, positions or token
        types) are pinned and the output's feature axis carries the weight's columns (the residual stream)."""
        w, idx = node.args[:2]
        wl, il = self.lab(w), self.lab(idx)
        if wl is None or len(wl) != 2:
            return self._unknown(node, val)
        self.uf.union(PIN, wl[0])
        self._origin(wl[1], node, w)
        self.labels[node] = tuple(il or self.fresh(shape_of(val)[:-1])) + (wl[1],)

    def op_conv(self, node, val):
        name = op_name(node)
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        xl, wl = self.lab(x), self.lab(w)
        if name in ("convolution", "_convolution"):
            # (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
            transposed, groups = bool(node.args[6]), int(node.args[8])
        else:  # convNd / conv_transposeNd: groups is argument 6
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
        elif (
            not transposed
            and w.meta["val"].shape[1] == 1
            and shape_of(x.meta["val"])[1] == groups
            and shape_of(val)[1] == groups
        ):
            out_label = self.uf.union(out_label, xl[1])  # depthwise: each channel on its own
        elif not transposed:
            # output channel o reads only its group's input channels: its units permute within their group
            # (`PermGroup.blocks` = groups, each its own permutation); moving an input channel within its group
            # would need that group's permutation on the weight rows of that group alone, which no axis permutation
            # expresses, so the input channels keep their order
            self.keep(
                xl[1],
                f"{name} with {groups} groups ({where}) reads its input channels in fixed groups, so they keep "
                "their order (its output channels are permuted within their groups)",
            )
            self.conv_groups.append((out_label, groups))
        else:
            self.block(xl[1], f"{name} with {groups} groups ({where}) mixes channels within groups")
            self.block(out_label, f"{name} with {groups} groups ({where}) mixes channels within groups")
        if isinstance(b, torch.fx.Node) and self.lab(b):
            self.uf.union(out_label, self.lab(b)[0])
        self._origin(out_label, node, w)
        out = self.fresh(shape_of(val))
        self.labels[node] = (xl[0], out_label) + out[2:]

    def op_batch_norm(self, node, val):
        x = node.args[0]
        xl = self.lab(x)
        if xl is None or len(xl) < 2:
            return self._unknown(node, val)
        for p in node.args[1:5]:
            if isinstance(p, torch.fx.Node) and self.lab(p):
                self.uf.union(xl[1], self.lab(p)[0])
        if isinstance(val, (tuple, list)):
            self.labels[node] = [tuple(xl)] + [
                (xl[1],) if shape_of(v) and len(shape_of(v)) == 1 else self._fresh_like(v) for v in val[1:]
            ]
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
        name = op_name(node)
        x = node.args[0]
        xl = self.lab(x)
        if name == "group_norm":
            groups, params = int(node.args[1]), node.args[2:4]
        else:  # native_group_norm(input, weight, bias, N, C, HxW, group, eps)
            groups, params = int(node.args[6]), node.args[1:3]
        channels = shape_of(x.meta["val"])[1]
        if groups not in (1, channels):
            self.block(
                xl[1],
                f"{name} with {groups} groups of {channels} channels ({self.where(node)}) "
                "normalises channels in fixed groups",
            )
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
                self.labels[node] = [tuple(self.lab(x))] + [
                    tuple(self.lab(x)) if shape_of(v) == shape_of(val[0]) else self._fresh_like(v) for v in val[1:]
                ]
                return
            self.labels[node] = None
            return
        shape = shape_of(val)
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
                    out[i + offset] = self.meet(out[i + offset], label, shape[i + offset])
        self.labels[node] = tuple(label if label is not None or s == 1 else PIN for label, s in zip(out, shape))
