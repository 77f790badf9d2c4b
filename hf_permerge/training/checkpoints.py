"""Checkpoint files: HF model folders, and optimizer state as safetensors (never pickle)."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io_utils import atomic_dir, write_json_atomic


def write_model_files(model, folder: Path) -> None:
    """config.json + model.safetensors, exactly what `from_pretrained` reads.

    Not `save_pretrained`: under torch.distributed, transformers writes only on rank 0, but here
    every process owns different nets and must write its own.
    """
    model.config.architectures = [type(model).__name__]   # what save_pretrained records (Hub widgets read it)
    model.config.save_pretrained(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})


@contextmanager
def _without_transformers_bars():
    """transformers draws a "Loading weights" bar per load; ours already say what is being done."""
    from transformers.utils import logging as hf_logging

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
    from safetensors import SafetensorError
    from transformers import AutoModelForImageClassification

    try:
        with _without_transformers_bars():
            return AutoModelForImageClassification.from_pretrained(folder)
    except SafetensorError as err:
        raise OSError(f"cannot read the weights in {folder} ({err}): the safetensors file is damaged or incomplete; "
                      "save or download the model again") from err


def save_model(model, folder: str | Path) -> None:
    """Write an HF model folder into a temp folder, renamed into place (safetensors only)."""
    with atomic_dir(folder) as tmp:
        write_model_files(model, tmp)


def optimizer_state_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten `optimizer.state_dict()` to named tensors plus JSON-able param groups."""
    tensors = {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            tensors[f"state.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_resume_state(folder: Path, model, opt_tensors: dict[str, torch.Tensor], opt_meta: dict, step: int) -> None:
    """Everything needed to continue a net's training exactly: weights, optimizer, step."""
    with atomic_dir(folder) as tmp:
        write_model_files(model, tmp)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        write_json_atomic(tmp / "trainer_state.json", {"step": step, "optimizer": opt_meta})


def load_resume_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict, int]:
    meta = json.loads((folder / "trainer_state.json").read_text())
    return load_file(str(folder / "optimizer.safetensors")), meta["optimizer"], int(meta["step"])
