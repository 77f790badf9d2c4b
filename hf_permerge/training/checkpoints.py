"""Training checkpoints: optimizer state as safetensors (never pickle) beside the model folders
(`hf_permerge.models.folders`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io_utils import atomic_dir, atomic_file, write_json_atomic
from ..models.folders import write_model_files
from ..records import TrainerStateRecord, read_record


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


def save_resume_state(
    folder: Path, model, opt_tensors: dict[str, torch.Tensor], opt_meta: dict, step: int, log_history=()
) -> None:
    """Everything needed to continue a net's training exactly: its whole state (parameters and buffers, such as
    BatchNorm's running statistics and counters), optimizer, step, the random number generators' states, and
    the evaluations so far (`log_history`)."""
    with atomic_dir(folder) as tmp:
        write_model_files(model, tmp)
        with atomic_file(tmp / "optimizer.safetensors") as path:
            save_file(opt_tensors, str(path))
        with atomic_file(tmp / "rng_state.safetensors") as path:
            save_file(_rng_state(), str(path))
        write_json_atomic(
            tmp / "trainer_state.json", {"step": step, "optimizer": opt_meta, "log_history": list(log_history)}
        )


def _rng_state() -> dict[str, torch.Tensor]:
    """torch's generators (CPU and each CUDA device) as tensors."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def load_rng_state(folder: Path) -> None:
    """Put back the generators' states a resume point saved (a point saved before they were kept has none)."""
    path = folder / "rng_state.safetensors"
    if not path.is_file():
        return
    state = load_file(str(path))
    torch.set_rng_state(state["cpu"])
    cuda = [state[f"cuda.{i}"] for i in range(len(state) - 1) if f"cuda.{i}" in state]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def load_resume_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict, int, list]:
    """(optimizer tensors, optimizer meta, step, log_history) of a resume point."""
    meta = read_record(
        folder / "trainer_state.json",
        TrainerStateRecord,
        "delete that resume point (the one before it, if any, is used) or train again with --overwrite",
    )
    tensors = load_file(str(folder / "optimizer.safetensors"))
    return tensors, meta["optimizer"], int(meta["step"]), list(meta.get("log_history", []))
