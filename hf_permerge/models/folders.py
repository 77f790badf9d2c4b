"""HF model folders, read and written the way every part of the package needs them: safetensors only, written
atomically, read without transformers' per-load progress bars, a damaged file named."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)
from transformers.utils import logging as hf_logging

from ..io_utils import atomic_dir, atomic_file


def check_finite(state: dict) -> None:
    """Refuse to save weights holding NaN or inf: a model that computes nothing must not look like a result."""
    import torch

    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(
            f"not saving the model: its weights {listed} hold NaN or inf, so the nets it was made from "
            "hold them too (a net whose training diverged: train it again with a lower training.lr)"
        )


def write_model_files(model, folder: Path) -> None:
    """config.json + model.safetensors, exactly what `from_pretrained` reads.

    Not `save_pretrained`: under torch.distributed, transformers writes only on rank 0, but here
    every process owns different nets and must write its own.
    """
    model.config.architectures = [type(model).__name__]  # what save_pretrained records (Hub widgets read it)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in _untied(model.state_dict()).items()}
    check_finite(state)
    with atomic_file(Path(folder) / "model.safetensors") as tmp:  # safetensors alone writes 0600 files
        save_file(state, str(tmp), metadata={"format": "pt"})


@contextmanager
def _without_transformers_bars():
    """transformers draws a "Loading weights" bar per load; ours already say what is being done."""
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _untied(state: dict) -> dict:
    """The state dict with each tied tensor once, under its first name (the input embedding, not the LM head):
    safetensors stores no shared tensors, and `from_pretrained` ties them again from the config."""
    seen, out = set(), {}
    for key, t in state.items():
        ident = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            continue
        seen.add(ident)
        out[key] = t
    return out


def unique_state(model) -> dict:
    """A model's state dict as its folder holds it: each tied tensor once (`_untied`)."""
    return _untied(model.state_dict())


AUTO_CLASSES = (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForImageClassification,
)
"""The kinds of model a merge loads, in the order tried for a config that names no architecture."""


def auto_class_for(config):
    """The Auto class whose mapping holds the class the config's `architectures` names (a causal or masked LM, a
    sequence or image classifier); for a config naming none, the first of `AUTO_CLASSES` that knows its type."""
    arch = (getattr(config, "architectures", None) or [None])[0]
    known = [auto for auto in AUTO_CLASSES if type(config) in auto._model_mapping]
    for auto in known:
        classes = auto._model_mapping[type(config)]
        classes = classes if isinstance(classes, (tuple, list)) else (classes,)
        if arch is None or arch in {c.__name__ for c in classes}:
            return auto
    kinds = "causal LM, masked LM, sequence classifier or image classifier"
    raise ValueError(
        f"cannot load a {arch or config.model_type!r} model: hf_permerge merges a {kinds} of a transformers "
        "architecture (never remote code); save the model with one of those heads"
    )


_LOADING = threading.Lock()
"""One `from_pretrained` at a time: it swaps class attributes while it loads (`PreTrainedModel.tie_weights` for a
no-op, put back after), so two loads on threads (a sweep's measure workers) could leave every later model of the
process with untied embeddings."""


def load_model(folder: str | Path):
    """An HF model folder (one safetensors file or shards with their index) through the Auto class its config names
    (`auto_class_for`), in its saved dtype; a damaged weights file is an OSError naming it."""
    try:
        with _LOADING, _without_transformers_bars():
            auto = auto_class_for(AutoConfig.from_pretrained(folder))
            return auto.from_pretrained(folder, dtype="auto")
    except SafetensorError as err:
        raise OSError(
            f"cannot read the weights in {folder} ({err}): the safetensors file is damaged or incomplete; "
            "save or download the model again"
        ) from err


def save_model(model, folder: str | Path, tokenizer=None) -> None:
    """Write an HF model folder into a temp folder, renamed into place (safetensors only); with a `tokenizer`,
    its files too, so that `AutoTokenizer.from_pretrained(folder)` reads it."""
    with atomic_dir(folder) as tmp:
        write_model_files(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
