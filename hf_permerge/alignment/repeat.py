"""A spec traced on a model's first few layers, repeated by name for all of its layers.

A deep model's layers are copies of one layer, so its spec is too: tracing a two-layer copy of its config finds
every rule, and the per-layer groups (`model.layers.1.mlp.gate_proj`) and the per-layer tensors of groups that
span layers (the residual stream's norms and projections) are renamed for every layer. Two traced layers let the
repetition be checked: layer 1's part of the spec must be layer 0's, renamed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from .spec import PermGroup, PermutationSpec

_LAYER = re.compile(r"^(.*?\.)(\d+)(\..*)$")
"""A name inside a layer: the first numeric part of its dotted path is the layer's index (`model.layers.3.mlp`)."""


def _template(name: str | None, layers: int) -> tuple[str | None, int | None]:
    """(the name with its layer index as `{}`, that index), or (name, None) outside the traced layers."""
    found = _LAYER.match(name) if name else None
    if found is None or int(found.group(2)) >= layers:
        return name, None
    return f"{found.group(1)}{{}}{found.group(3)}", int(found.group(2))


def _fill(template: str | None, layer: int) -> str | None:
    return None if template is None else template.replace("{}", str(layer))


def repeat_layers(
    spec: PermutationSpec, traced_layers: int, num_layers: int, shapes: Mapping | None = None
) -> PermutationSpec:
    """The spec of the same model with `num_layers` layers, from `spec`, traced with `traced_layers` (>= 2).

    `shapes`: name -> tensor (or anything with `.shape`) of the full model: group sizes are read from it (the
    traced copy may have had another vocabulary) and the result is validated against it.
    """
    if traced_layers < 2:
        raise ValueError("repeating a spec by layer needs it traced on at least two layers, to check the repetition")
    per_layer: list[tuple[str, tuple, PermGroup]] = []  # (name template, axes templates, group) of layer 0
    seen: dict[int, list] = {i: [] for i in range(traced_layers)}
    spanning: list[tuple[PermGroup, list, dict[int, list]]] = []  # stream-like groups: fixed axes, per-layer axes
    position: int | None = None  # where the per-layer groups go among the spanning ones
    for g in spec.groups:
        name, layer = _template(g.name, traced_layers)
        axes = [(*_template(key, traced_layers), axis, None) for key, axis in g.axes] + [
            (*_template(key, traced_layers), axis, part) for key, axis, part in g.parts
        ]  # (key template, layer, axis, part or None for the whole axis)
        if layer is not None and all(i == layer for _, i, _, _ in axes):
            key = (name, tuple((k, a, p) for k, _, a, p in axes), g.size, g.blocks, g.rigid, g.runs)
            seen[layer].append(key)
            if layer == 0:
                per_layer.append((name, key[1], g))
                position = len(spanning) if position is None else position
            continue
        fixed = [(k, a, p) for k, i, a, p in axes if i is None]
        layered: dict[int, list] = {i: [] for i in range(traced_layers)}
        for k, i, a, p in axes:
            if i is not None:
                layered[i].append((k, a, p))
        if len({tuple(v) for v in layered.values()}) != 1:
            raise ValueError(f"group {g.name!r} does not touch every traced layer alike; its spec cannot be repeated")
        spanning.append((g, fixed, layered))
    if len({tuple(v) for v in seen.values()}) != 1:
        raise ValueError("the traced layers have different groups; the spec cannot be repeated by layer")
    for coupled in spec.couplings:
        if len({_template(n, traced_layers)[1] for n in coupled}) != 1:
            raise ValueError(f"coupling {coupled} spans layers; the spec cannot be repeated by layer")

    def size(g: PermGroup, axes) -> int:
        key, axis = next(((k, a) for k, a, p in axes if p is None), (None, None))
        return int(shapes[key].shape[axis]) if shapes is not None and key in shapes else g.size

    def moved(g: PermGroup, name: str, axes) -> PermGroup:
        whole, parts = tuple((k, a) for k, a, p in axes if p is None), tuple(e for e in axes if e[2] is not None)
        return dataclasses.replace(g, name=name, size=size(g, axes), axes=whole, parts=parts)

    def renamed(g: PermGroup, layer: int, name: str, axes) -> PermGroup:
        filled = [(_fill(k, layer), a, p) for k, a, p in axes]
        return dataclasses.replace(
            moved(g, name, filled),
            name=_fill(name, layer),
            activation=_fill(_template(g.activation, traced_layers)[0], layer),
            preactivation=_fill(_template(g.preactivation, traced_layers)[0], layer),
        )

    layer_groups = [renamed(g, i, name, axes) for i in range(num_layers) for name, axes, g in per_layer]
    streams = [
        moved(g, g.name, fixed + [(_fill(k, i), a, p) for i in range(num_layers) for k, a, p in layered[0]])
        for g, fixed, layered in spanning
    ]
    at = len(streams) if position is None else position
    couplings = tuple(c for c in spec.couplings if _template(c[0], traced_layers)[1] is None) + tuple(
        tuple(_fill(_template(n, traced_layers)[0], i) for n in coupled)
        for i in range(num_layers)
        for coupled in spec.couplings
        if _template(coupled[0], traced_layers)[1] == 0
    )
    result = PermutationSpec(tuple(streams[:at] + layer_groups + streams[at:]), couplings)
    if shapes is not None:
        result.validate(shapes)
    return result
