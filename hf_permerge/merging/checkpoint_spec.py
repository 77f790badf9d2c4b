"""The permutation spec of a checkpoint on disk, without loading it: traced on a two-layer copy of its config.

Tracing needs the graph, not the weights, and a deep model's layers repeat one layer: a random two-layer copy at
full width (a small vocabulary: the embeddings' rows are never permuted) is traced and its spec repeated by name
for every layer (`alignment.repeat`), then checked against the checkpoint's own shapes, read from its headers.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping

import torch

from ..alignment.repeat import repeat_layers
from ..alignment.spec import PermutationSpec
from ..alignment.tracing import TracedSpec, example_inputs_for, trace
from ..models.folders import auto_class_for

logger = logging.getLogger("hf_permerge.merging")

TRACED_LAYERS = 2
TRACED_VOCABULARY = 256


def _small_copy(config):
    """The config with `TRACED_LAYERS` layers and a small vocabulary (above every special token id)."""
    small = copy.deepcopy(config)
    layers = small.num_hidden_layers
    small.num_hidden_layers = min(TRACED_LAYERS, layers)
    if isinstance(getattr(small, "layer_types", None), list):
        small.layer_types = small.layer_types[: small.num_hidden_layers]
    ids = [v for k, v in small.to_dict().items() if k.endswith("token_id") and isinstance(v, int)]
    vocab = getattr(small, "vocab_size", None)
    if isinstance(vocab, int):
        small.vocab_size = min(vocab, max([TRACED_VOCABULARY, *(i + 1 for i in ids)]))
    return small, layers


def checkpoint_spec(config, shapes: Mapping[str, torch.Tensor]) -> tuple[PermutationSpec, TracedSpec]:
    """(the spec of the model `config` describes, with all its layers; the trace of its two-layer copy).

    `shapes`: the checkpoint's tensors by name (meta tensors do: only shapes are read), which the spec must fit."""
    small, layers = _small_copy(config)
    model = auto_class_for(small).from_config(small).float().eval()
    traced = trace(model, example_inputs_for(model), on_unsupported="skip")
    for what, groups in (("leaves unpermuted", traced.skipped), ("keeps in place", traced.kept)):
        if groups:
            logger.info(
                "traced spec %s %d groups: %s", what, len(groups), "; ".join(f"{k}: {v}" for k, v in groups.items())
            )
    spec = _stored_keys_only(traced.spec, model, shapes)
    del model
    if small.num_hidden_layers == layers:
        spec.validate(shapes)
        return spec, traced
    return repeat_layers(spec, small.num_hidden_layers, layers, shapes), traced


def _stored_keys_only(spec: PermutationSpec, model, shapes: Mapping) -> PermutationSpec:
    """The spec without the tied copies a checkpoint does not store (GPT-2's `lm_head.weight`, the embeddings' twin):
    `save_pretrained` writes a tied tensor once, and permuting the stored one permutes both."""
    state = model.state_dict(keep_vars=True)
    by_storage: dict = {}
    for key, t in state.items():
        by_storage.setdefault((t.data_ptr(), tuple(t.shape)), []).append(key)
    absent = {k for keys in by_storage.values() if len(keys) > 1 for k in keys if k not in shapes}
    if not absent:
        return spec
    groups = tuple(
        dataclasses.replace(
            g,
            axes=tuple(e for e in g.axes if e[0] not in absent),
            parts=tuple(e for e in g.parts if e[0] not in absent),
        )
        for g in spec.groups
    )
    return PermutationSpec(groups, spec.couplings)
