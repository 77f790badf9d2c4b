"""Activation matching of two checkpoints on disk without holding either: each layer's weights are read from the
safetensors shards when a forward pass reaches it and dropped after it (accelerate's disk offload, reading the
checkpoint's own files, nothing copied), and the statistics are gathered in passes bounded by
`max_statistics_mb` (`ActivationMatcher`). Memory: one layer of each model, a batch's activations, the
statistics of one pass; never the models, never tokens x units for all tokens.

    from hf_permerge.merging.offloaded import match_activations_offloaded
    perms = match_activations_offloaded("models/a", "models/b", token_split, spec, max_statistics_mb=2048)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoTokenizer

from ..alignment.activation import ActivationMatcher
from ..alignment.permutations import Permutations
from ..alignment.spec import PermutationSpec
from ..alignment.tracing import attach_permutation_spec
from ..data.tokens import TokenSplit, model_token_split
from ..models.folders import auto_class_for, load_config, load_model


def offload_map(model: nn.Module) -> dict[str, str]:
    """accelerate's device map that leaves every block of the model's layer stack (its largest `nn.ModuleList`) on
    disk, one entry each, and every other module holding weights (embeddings, final norm, head) on disk too; only
    modules without weights (rotary tables) stay on the CPU. Each entry is loaded for its own forward only."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no stack of layers (nn.ModuleList) to read one at a time")
    stack, _ = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    out: dict[str, str] = {}

    def place(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path == stack:
                out.update({f"{path}.{i}": "disk" for i in range(len(child))})
            elif stack.startswith(path + "."):
                place(path + ".", child)
            else:
                out[path] = "disk" if any(True for _ in child.parameters()) else "cpu"

    place("", model)
    return out


def load_offloaded(folder: str | Path, offload_dir: str | Path, spec: PermutationSpec, dtype=torch.float32):
    """The model of `folder` (its Auto class), every weight left on disk per `offload_map`, computing in `dtype`
    (float32: statistics in fp32 whatever the checkpoint's dtype), with `spec` attached for the matchers."""
    config = load_config(folder)
    with init_empty_weights():
        skeleton = auto_class_for(config).from_config(config)
    model = load_model(folder, device_map=offload_map(skeleton), offload_folder=str(offload_dir), dtype=dtype)
    return attach_permutation_spec(model.eval(), spec)


OFFLOAD_PREFIX = "hf_permerge-offload-"
"""The scratch folders of `match_activations_offloaded`, in the temp folder, named by their process's PID."""


def remove_dead_offload_folders() -> None:
    """Remove the scratch folders of processes that are gone (a SIGKILL skips the clean-up of `TemporaryDirectory`)."""
    for entry in Path(tempfile.gettempdir()).glob(f"{OFFLOAD_PREFIX}*-*"):
        pid = entry.name[len(OFFLOAD_PREFIX) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def match_activations_offloaded(
    a: str | Path,
    b: str | Path,
    data,
    spec: PermutationSpec,
    max_statistics_mb: int | None = 2048,
    **settings,
) -> Permutations:
    """Activation matching of checkpoint folder `b` onto `a` on `data` (a `TokenSplit`), both models read layer by
    layer from their shards. `settings` as `ActivationMatcher`'s (similarity, num_examples, batch_size, ...)."""
    remove_dead_offload_folders()
    with tempfile.TemporaryDirectory(prefix=f"{OFFLOAD_PREFIX}{os.getpid()}-") as scratch:
        model_a = load_offloaded(a, Path(scratch) / "a", spec)
        model_b = load_offloaded(b, Path(scratch) / "b", spec)
        matcher = ActivationMatcher(max_statistics_mb=max_statistics_mb, **settings)
        return matcher.match(model_a, model_b, data)


def checkpoint_tokens(
    folder: str | Path, dataset, text_column: str | None = None, num_examples: int | None = None, seed: int = 0
) -> TokenSplit:
    """The sequences of a `datasets.Dataset` (input_ids, or text tokenized by the tokenizer saved in `folder`) for
    the checkpoint in `folder`, checked against its config (positions, vocabulary) without loading its weights;
    a seeded subset of `num_examples` sequences."""
    if isinstance(dataset, TokenSplit):
        return dataset.subset(num_examples, seed)
    config = load_config(folder)  # first: refuses a folder naming code before its tokenizer is read
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model_token_split(dataset, tokenizer, config, text_column, num_examples, seed)
