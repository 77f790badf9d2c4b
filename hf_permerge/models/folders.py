"""HF model folders, read and written the way every part of the package needs them: safetensors only, written
atomically, read without transformers' per-load progress bars, a damaged file named."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification
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
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
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


def load_model(folder: str | Path):
    """An HF model folder through `AutoModelForImageClassification` (any registered image classifier); a
    damaged weights file is an OSError naming it, not safetensors' own error."""
    try:
        with _without_transformers_bars():
            return AutoModelForImageClassification.from_pretrained(folder)
    except SafetensorError as err:
        raise OSError(
            f"cannot read the weights in {folder} ({err}): the safetensors file is damaged or incomplete; "
            "save or download the model again"
        ) from err


def save_model(model, folder: str | Path) -> None:
    """Write an HF model folder into a temp folder, renamed into place (safetensors only)."""
    with atomic_dir(folder) as tmp:
        write_model_files(model, tmp)
