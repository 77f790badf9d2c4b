"""Op rules for shapes: reshapes (attention heads), products, transposes, concatenation, indexing, pooling."""

from __future__ import annotations

import torch

from .ops import PIN, op_name, shape_of


class ShapeRules:
    """`op_<name>` rules of `Analysis` for shapes and contractions (a mixin: the state is the analysis')."""

    def op_reshape(self, node, val):
        x = node.args[0]
        xl = self.lab(x)
        in_shape, out_shape = shape_of(x.meta["val"]), shape_of(val)
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
                    ia.append(src[i])
                    pi *= src[i][1]
                    i += 1  # noqa: E702
                elif j < len(dst):
                    oa.append(dst[j])
                    po *= dst[j][1]
                    j += 1  # noqa: E702
                else:
                    break
            if len(ia) == 1 and len(oa) == 1:
                out[oa[0][0]] = xl[ia[0][0]]
                continue
            if self._heads(xl, ia, oa, out):
                continue
            if self._shared_heads(node, xl, ia, oa, out):
                continue
            sizes_in, sizes_out = [s for _, s in ia], [s for _, s in oa]
            for axis, size in ia:
                what = (
                    f"splits an axis of size {size} into {sizes_out} (as attention heads do)"
                    if len(ia) == 1
                    else f"merges an axis of size {size} with others into one (sizes {sizes_in} -> {sizes_out}; as a "
                    "flatten of conv channels with spatial positions before a Linear does)"
                )
                self.block(xl[axis], f"{op_name(node)} ({self.where(node)}) {what}")
            for axis, _ in oa:
                out[axis] = PIN
        self.labels[node] = tuple(out)

    def _is_group(self, label) -> bool:
        return label is not None and self.uf.find(label) != self.uf.find(PIN)

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
            out[head_axis], out[unit_axis] = PIN, label
            return True
        if len(ia) == 2 and len(oa) == 1:
            (head_axis, heads), (unit_axis, _) = ia
            label = xl[unit_axis]
            split = any(h == heads and self.uf.find(lab) == self.uf.find(label) for lab, h in self.head_splits)
            if split and self._is_group(label) and not self._is_group(xl[head_axis]):
                out[oa[0][0]] = label
                return True
        return False

    def _shared_heads(self, node, xl, ia, oa, out) -> bool:
        """Grouped-query attention: value heads split as `kv` heads, repeated for their groups of query heads and
        merged back as more heads. The value projection's units would need its permutation repeated on the output
        projection's inputs, which a group cannot express: they keep their order within each key/value head (a keep
        of one head's extent); whole key/value heads still move with their query heads (`heads.whole_heads`)."""
        if not (len(ia) == 2 and len(oa) == 1):
            return False
        (head_axis, heads), (unit_axis, _) = ia
        label = xl[unit_axis]
        if not self._is_group(label) or self._is_group(xl[head_axis]):
            return False
        split = [h for lab, h in self.head_splits if self.uf.find(lab) == self.uf.find(label)] or [1]  # 1: MQA
        if heads % split[0] or split[0] == heads:
            return False
        self.keep(
            label,
            f"grouped-query attention ({self.where(node)}): {split[0]} key/value heads are shared by {heads} query "
            "heads, so the value units cannot move without repeating their permutation on the output projection",
            ia[1][1],
        )
        out[oa[0][0]] = label
        return True

    def op_split(self, node, val):
        """split / split_with_sizes / chunk along a group's axis (GPT-2's fused q/k/v projection, GPT-NeoX's per-head
        [q k v], Phi-3's gate | up): each output is a *part* of the group's units, with a label of its own that the
        rules follow on (`part`); unbind picks single units."""
        x = node.args[0]
        xl = list(self.lab(x))
        name = op_name(node)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim = int(dim) % len(xl)
        if name == "unbind":
            dim = int(node.args[1]) % len(xl) if len(node.args) > 1 else 0
            self.block(xl[dim], f"unbind ({self.where(node)}) picks single units of a group")
            self.labels[node] = [tuple(xl[:dim] + xl[dim + 1 :]) for _ in val]
            return
        if not self._is_group(xl[dim]):
            self.labels[node] = [tuple(xl) for _ in val]
            return
        in_size, out, start = shape_of(x.meta["val"])[dim], [], 0
        for i, v in enumerate(val):
            width = shape_of(v)[dim]
            out.append(tuple(xl[:dim] + [self.part(xl[dim], (node.name, i), start, width, in_size)] + xl[dim + 1 :]))
            start += width
        self.labels[node] = out

    def part(self, label, name, start: int, width: int, in_size: int):
        """A new label for units [start, start + width) of an axis of `in_size` units carrying `label` (one head's
        units, alike for every head, where the axis was split into heads): the units of a fused projection's part.
        `build` gives it the producing tensors' positions of that part (`AxisPart`)."""
        element = ("part", *name)
        self.uf.find(element)
        self.parts[element] = (label, start, width, in_size)
        heads = {h for lab, h in self.head_splits if self.uf.find(lab) == self.uf.find(label)}
        if len(heads) == 1:  # the part of every head: its units are split into the same heads
            self.head_splits.append((element, heads.pop()))
        return element

    op_split_with_sizes = op_chunk = op_unbind = op_split

    def op_scaled_dot_product_attention(self, node, val):
        """softmax(q k^T / sqrt(d)) v over (..., heads, tokens, units): q's and k's units are contracted
        (one group), v's units pass to the output; the leading axes broadcast. Whole heads may move (a coupling)
        unless the mask differs between heads (Swin's relative position bias, ALiBi): it stays with its head."""
        ql, kl, vl = (self.lab(a) for a in node.args[:3])
        if not all(isinstance(lab, tuple) and len(lab) >= 2 for lab in (ql, kl, vl)):
            return self._unknown(node, val)
        self.uf.union(ql[-1], kl[-1])
        self.uf.union(kl[-2], vl[-2])
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        mask_shape = shape_of(mask.meta.get("val")) if isinstance(mask, torch.fx.Node) else None
        if not (mask_shape and len(mask_shape) >= 3 and mask_shape[-3] > 1):
            self.head_couplings.append((ql[-1], vl[-1]))
        out = list(ql[:-1]) + [vl[-1]]
        for i in range(len(out) - 2):
            out[i] = self.uf.union(
                self.uf.union(out[i], kl[i] if i < len(kl) else None), vl[i] if i < len(vl) else None
            )
        self.labels[node] = tuple(out)

    def op_matmul(self, node, val):
        """a @ b: the contracted axes (a's last, b's second to last) are one group; batch axes broadcast."""
        al, bl = self.lab(node.args[0]), self.lab(node.args[1])
        if not isinstance(al, tuple) or not isinstance(bl, tuple) or len(al) < 2 or len(bl) < 2:
            return self._unknown(node, val)
        self.uf.union(al[-1], bl[-2])
        left = node.args[0]
        if (
            left in self.scores and self.scores[left] is not None and len(bl) >= 3
        ):  # softmax(q k^T) @ v: eager attention
            self.head_couplings.append((self.scores[left], bl[-1]))
        elif (
            len(al) >= 3
            and self._is_group(al[-1])
            and any(self.uf.find(lab) == self.uf.find(al[-1]) for lab, _ in self.head_splits)
        ):
            self.scores[node] = al[-1]  # q k^T over a group split into heads: attention scores, per head
        shape = shape_of(val)
        out = [None] * len(shape)
        for batch in (al[:-2], bl[:-2]):
            offset = len(shape) - 2 - len(batch)
            for i, label in enumerate(batch):
                out[offset + i] = self.uf.union(out[offset + i], label)
        out[-2], out[-1] = al[-2], bl[-1]
        self.labels[node] = tuple(label if label is not None or s == 1 else PIN for label, s in zip(out, shape))

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
        shape = shape_of(val)
        offset = len(shape) - len(xl)
        out = list(self.fresh(shape[:offset]))
        for i, label in enumerate(xl):
            s = shape[offset + i]
            out.append(label if label is not None else (None if s == 1 else PIN))
        self.labels[node] = tuple(out)

    def op_expand_as(self, node, val):
        self.op_expand(node, val)

    def op_cat(self, node, val):
        tensors = node.args[0]
        dim = int(node.args[1]) if len(node.args) > 1 else int(node.kwargs.get("dim", 0))
        shape = shape_of(val)
        dim %= len(shape)
        out = [None] * len(shape)
        parts = [t for t in tensors if t.meta["val"].numel()]  # an empty cache concatenated in front adds nothing
        for t in parts:
            tl = self.lab(t)
            if len(tl) != len(shape):
                continue
            for i, label in enumerate(tl):
                if i == dim and self._is_group(label):  # rotate_half: cat((-x2, x1)) of one head's units
                    self.keep(label, f"cat ({self.where(node)}) concatenates along a group's axis", shape[dim])
                out[i] = self.uf.union(out[i], label)
        if out[dim] is None or not self._is_group(out[dim]):
            out[dim] = None if shape[dim] == 1 else PIN
        self.labels[node] = tuple(label if label is not None or s == 1 else PIN for label, s in zip(out, shape))

    def op_stack(self, node, val):
        tensors = node.args[0]
        dim = int(node.args[1]) if len(node.args) > 1 else 0
        shape = shape_of(val)
        dim %= len(shape)
        rest = [None] * (len(shape) - 1)
        for t in tensors:
            for i, label in enumerate(self.lab(t)):
                rest[i] = self.uf.union(rest[i], label)
        out = rest[:dim] + [None if shape[dim] == 1 else PIN] + rest[dim:]
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
        step = int(node.args[4]) if len(node.args) > 4 else 1
        in_size, out_size = shape_of(x.meta["val"])[dim], shape_of(val)[dim]
        head_split = any(self.uf.find(lab) == self.uf.find(xl[dim]) for lab, _ in self.head_splits)
        if in_size != out_size and self._is_group(xl[dim]) and step == 1 and out_size > 1 and not head_split:
            start = int(node.args[2] or 0) if len(node.args) > 2 else 0  # a fused projection's part (Phi-3's q | k | v)
            start = start + in_size if start < 0 else min(start, in_size)
            xl[dim] = self.part(xl[dim], (node.name,), start, out_size, in_size)
        elif in_size != out_size:
            if self._is_group(xl[dim]):  # rotary embeddings: the halves of each head's units
                in_size = shape_of(x.meta["val"])[dim]
                self.keep(xl[dim], f"slice ({self.where(node)}) takes part of a group's units", in_size)
            if shape_of(val)[dim] == 1 or not self._is_group(xl[dim]):
                xl[dim] = None if shape_of(val)[dim] == 1 else PIN
        self.labels[node] = tuple(xl)

    def op_pad(self, node, val):
        """pad(x, (last_lo, last_hi, second_last_lo, ...)): constant, reflected or replicated values at the edges of
        the padded axes, alike for every unit of the others, so a group on an unpadded axis passes (a conv's
        channels when its spatial positions are padded); padding a group's own axis adds units in fixed places."""
        x, pads = node.args[0], list(node.args[1])
        xl = list(self.lab(x))
        for k in range(len(pads) // 2):
            axis = len(xl) - 1 - k
            if pads[2 * k] == 0 and pads[2 * k + 1] == 0:
                continue
            self.block(xl[axis], f"{op_name(node)} ({self.where(node)}) pads a group's axis")
            xl[axis] = None if shape_of(val)[axis] == 1 else PIN
        self.labels[node] = tuple(xl)

    op_constant_pad_nd = op_pad

    def op_roll(self, node, val):
        """roll(x, shifts, dims): moves positions along `dims` cyclically (Swin's shifted windows), alike for every
        unit of the other axes, so groups there pass; rolling a group's own axis (or the flattened tensor) blocks."""
        x = node.args[0]
        xl = list(self.lab(x))
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims", [])
        dims = [dims] if isinstance(dims, int) else list(dims)
        for axis in [int(d) % len(xl) for d in dims] or range(len(xl)):
            self.block(xl[axis], f"roll ({self.where(node)}) moves a group's units cyclically")
            xl[axis] = None if shape_of(val)[axis] == 1 else PIN
        self.labels[node] = tuple(xl)

    def op_pool(self, node, val):
        xl = self.lab(node.args[0])
        where = self.where(node)
        for label in xl[2:]:
            self.block(label, f"{op_name(node)} ({where}) pools over a group's axis")
        outs = val if isinstance(val, (tuple, list)) else [val]
        labels = [tuple(xl[:2]) + self.fresh(shape_of(v))[2:] for v in outs]
        self.labels[node] = labels if isinstance(val, (tuple, list)) else labels[0]

    def op_reduction(self, node, val):
        x = node.args[0]
        xl = self.lab(x)
        ndim = len(xl)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(dims, torch.fx.Node):  # min / max of two tensors (T5's position buckets): elementwise
            return self.op_pointwise(node, val)
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = list(range(ndim))
        elif isinstance(dims, int):
            dims = [dims]
        if not all(isinstance(d, int) for d in dims):
            return self._unknown(node, val)
        dims = {d % ndim for d in dims}
        if isinstance(val, (tuple, list)) and op_name(node) in ("max", "min"):  # (values, indices into the axis)
            for d in dims:
                self.block(xl[d], f"{op_name(node)} ({self.where(node)}) returns indices into a group's axis")
        # any other reduction over the whole axis (sum, mean, norm, var: RMSNorm's mean of squares) does not
        # depend on the order of the units, so the group passes it: the reduced axis simply ends
        kept = [label if i not in dims else None for i, label in enumerate(xl)]
        outs = val if isinstance(val, (tuple, list)) else [val]
        labels = []
        for v in outs:
            shape = shape_of(v)
            if shape is None:
                labels.append(None)
            elif len(shape) == ndim:
                labels.append(tuple(kept))
            else:
                labels.append(tuple(label for i, label in enumerate(kept) if i not in dims))
        self.labels[node] = labels if isinstance(val, (tuple, list)) else labels[0]

    def op_creation(self, node, val):
        self.labels[node] = self._fresh_like(val)
