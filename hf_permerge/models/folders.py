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
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import logging as hf_logging

from ..io_utils import atomic_dir, atomic_file
from ..shards import INDEX_NAME, WEIGHTS_NAME, tensor_files
from .trust import check_no_remote_code, read_json


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
        try:
            save_file(state, str(tmp), metadata={"format": "pt"})
        except SafetensorError as err:  # a full disk comes as the library's own error, not an OSError
            raise OSError(
                f"cannot write {folder}/model.safetensors ({err}); free space there or write elsewhere"
            ) from None


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


def load_config(folder: str | Path):
    """The config of a model folder, through `AutoConfig` once nothing in the folder names code
    (`check_no_remote_code`); a missing or damaged config.json, or a field of the wrong type, is one error naming it."""
    folder = Path(folder)
    check_no_remote_code(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: a model folder holds its config beside its safetensors weights; "
            "save the model with save_pretrained"
        )
    data = read_json(path)
    if not isinstance(data.get("model_type"), str):
        raise ValueError(f"{path} names no model_type; save the model with save_pretrained of a transformers model")
    if data["model_type"] not in CONFIG_MAPPING:
        raise ValueError(
            f"{path} names model_type {data['model_type']!r}, which this transformers does not know; upgrade "
            "transformers, or merge models of an architecture it ships (never remote code)"
        )
    check_field_types(CONFIG_MAPPING[data["model_type"]], data, path)
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - transformers' validators raise their own types
        said = " ".join(str(err).split())[:300]
        raise ValueError(f"cannot read {path} ({said}); correct it, or save the model again") from None


def check_field_types(config_class, data: dict, path: Path) -> None:
    """Refuse a config field whose type differs from its class's default (`hidden_size: "sixty-four"`)."""
    try:
        defaults = config_class()
    except Exception:  # noqa: BLE001 - a config class that needs arguments: nothing to compare against
        return
    for key, value in data.items():
        default = getattr(defaults, key, None)
        if value is None or isinstance(value, (list, dict)):  # unset, or several ids (Llama 3's eos_token_id)
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            continue
        if not ok:
            raise ValueError(
                f"{path}: {key} is {value!r}, but a {defaults.model_type} config takes a {type(default).__name__} "
                f"there (e.g. {default!r}); correct the field or save the model again"
            )


def _file_of(folder: Path, files: dict[str, str], name: str) -> str:
    """Where a tensor is, or would be, for a message: its weights file, or the folder's index."""
    if name in files:
        return str(folder / files[name])
    return str(folder / (INDEX_NAME if (folder / INDEX_NAME).is_file() else WEIGHTS_NAME))


def check_loading_info(info: dict, folder: Path, files: dict[str, str]) -> None:
    """Refuse a model that transformers loaded only in part: a tensor missing from its files (it would keep its random
    init), one its class has no place for, or one of the wrong shape, named with the file."""
    fix = "the folder's weights do not fit its config: save or download the model again"
    for name in sorted(info.get("missing_keys") or ()):
        raise ValueError(f"{name} is missing from {_file_of(folder, files, name)} (it would be left random); {fix}")
    for name in sorted(info.get("unexpected_keys") or ()):
        raise ValueError(f"{_file_of(folder, files, name)} holds {name}, which its config's model has not; {fix}")
    for name, theirs, ours in sorted(info.get("mismatched_keys") or (), key=str):
        raise ValueError(
            f"{name} in {_file_of(folder, files, name)} has shape {tuple(theirs)}, its config's model takes "
            f"{tuple(ours)}; {fix}"
        )
    for message in info.get("error_msgs") or ():
        raise ValueError(f"cannot load {folder}: {message.splitlines()[0]}; {fix}")


def non_finite_error(name: str, where) -> ValueError:
    """The one message for weights holding NaN or inf, on every path."""
    return ValueError(
        f"{name} in {where} holds NaN or inf, so nothing can be matched or merged with it (a net whose training "
        "diverged: train it again with a lower learning rate, or merge another checkpoint)"
    )


def check_finite_parameters(model, folder: Path, files: dict[str, str]) -> None:
    """Refuse weights holding NaN or inf before they are matched (a cost matrix of them means nothing)."""
    import torch

    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise non_finite_error(name, _file_of(folder, files, name))


def load_model(folder: str | Path, **kwargs):
    """An HF model folder (one safetensors file or shards with their index) through the Auto class its config names
    (`auto_class_for`), in its saved dtype, never its code; every weights file's header checked first and the
    loading info after (`check_loading_info`), so a damaged or incomplete folder is one error naming the file.
    `kwargs` go to `from_pretrained` (a device map)."""
    folder = Path(folder)
    config = load_config(folder)
    files = tensor_files(folder)
    try:
        with _LOADING, _without_transformers_bars():
            auto = auto_class_for(config)
            settings = {"dtype": "auto", **kwargs, "output_loading_info": True, "ignore_mismatched_sizes": True}
            model, info = auto.from_pretrained(folder, config=config, trust_remote_code=False, **settings)
    except SafetensorError as err:
        raise OSError(
            f"cannot read the weights in {folder} ({err}): the safetensors file is damaged or incomplete; "
            "save or download the model again"
        ) from err
    check_loading_info(info, folder, files)
    if "device_map" not in kwargs:
        check_finite_parameters(model, folder, files)
    return model


def save_model(model, folder: str | Path, tokenizer=None) -> None:
    """Write an HF model folder into a temp folder, renamed into place (safetensors only); with a `tokenizer`,
    its files too, so that `AutoTokenizer.from_pretrained(folder, trust_remote_code=False)` reads it."""
    with atomic_dir(folder) as tmp:
        write_model_files(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
