"""What every matcher shares: the `Matcher` base class, the checks of its inputs, and small model helpers.

A matcher aligns model_b ONTO model_a: model_a is the reference and stays as it is;
`matcher.match(model_a, model_b, data).apply(model_b)` lines up unit by unit with model_a.
Data comes in one form, tensors (`hf_permerge.data.TensorSplit`); a `datasets.Dataset` is converted before it
gets here (`hf_permerge.merging.as_tensor_split`, or `PermMerger.align`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
from torch import nn

from .hungarian import objective_summary
from .permutations import Permutations
from .spec import PermutationSpec


@dataclasses.dataclass
class Matcher:
    """Base class: settings are the dataclass fields (constructor kwargs), `name` is the registry key."""

    name: ClassVar[str] = ""

    @property
    def settings(self) -> dict:
        return dataclasses.asdict(self)

    def match(self, model_a: nn.Module, model_b: nn.Module, data=None) -> Permutations:  # pragma: no cover
        raise NotImplementedError

    def _info(self, similarities: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor], data) -> dict:
        """The header a `Permutations` carries: matcher, settings, data, and per group the summed
        similarity of the identity matching next to that of the matching found."""
        return self._header({g: objective_summary(s, perms[g]) for g, s in similarities.items()}, data)

    def _header(self, groups: dict, data) -> dict:
        """As `_info`, from each group's objectives (`objective_summary`) already computed."""
        data_info = None if data is None else {"fingerprint": data.fingerprint, "num_examples": len(data)}
        return {"matcher": self.name, "settings": self.settings, "data": data_info, "groups": groups}


def check_choice(setting: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{setting}={value!r} is not supported; choose one of {list(choices)}")


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> PermutationSpec:
    """The shared spec of two nets, or a ValueError naming how they differ."""
    for which, m in (("model_a", model_a), ("model_b", model_b)):
        if not hasattr(m, "permutation_spec"):
            raise TypeError(
                f"{which} ({type(m).__name__}) does not declare a permutation spec; "
                "use one of the hf_permerge model classes, or give it a traced spec: "
                "hf_permerge.alignment.attach_permutation_spec(model, on_unsupported='skip')"
            )
    if type(model_a) is not type(model_b):
        raise ValueError(f"cannot match nets of different types: {type(model_a).__name__} vs {type(model_b).__name__}")
    spec_a, spec_b = model_a.permutation_spec(), model_b.permutation_spec()
    if spec_a != spec_b:
        desc = lambda s: [(g.name, g.size) for g in s.groups]  # noqa: E731
        raise ValueError(
            f"cannot match nets of different architectures: groups (name, width) {desc(spec_a)} vs {desc(spec_b)}"
        )
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    spec_a.validate(sd_a)
    for key, t in sd_a.items():
        if key not in sd_b or sd_b[key].shape != t.shape:
            other = tuple(sd_b[key].shape) if key in sd_b else "missing"
            raise ValueError(
                f"cannot match nets of different architectures: {key!r} has shape "
                f"{tuple(t.shape)} in model_a and {other} in model_b"
            )
    return spec_a


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes: its parameters' device, or for a model whose weights are offloaded (on the meta
    device until a layer runs) the execution device accelerate recorded, else the CPU."""
    device = next(model.parameters()).device
    if device.type != "meta":
        return device
    placed = {d for d in (getattr(model, "hf_device_map", None) or {}).values() if d not in ("disk", "meta")}
    return torch.device(placed.pop()) if len(placed) == 1 else torch.device("cpu")


def model_input(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pixels on the model's device in the model's dtype (a float64 or bfloat16 net takes its own)."""
    p = next(model.parameters())
    return pixel_values.to(device=p.device, dtype=p.dtype)


def input_shape(model: nn.Module) -> tuple | None:
    """(channels, height, width) from the model's config (None where it does not say: a ResNet takes any size);
    None when it records no channel count."""
    cfg = getattr(model, "config", None)
    if not hasattr(cfg, "num_channels"):
        return None
    size = getattr(cfg, "image_size", None)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return (cfg.num_channels, *size)


def input_shape_text(model: nn.Module) -> str:
    return "(" + ", ".join("any" if d is None else str(d) for d in input_shape(model)) + ")"


def fits(pixel_values: torch.Tensor, model: nn.Module) -> bool:
    """Whether (N, C, H, W) pixels have the input shape the model's config records."""
    want = input_shape(model)
    return want is None or all(w is None or w == h for h, w in zip(pixel_values.shape[1:], want))


def check_matching_data(data, model: nn.Module) -> None:
    """Refuse what a data-driven matcher cannot use: no data, anything but the tensor form (pixel_values (N, C, H, W)
    normalised for the model, labels, fingerprint: `hf_permerge.data.TensorSplit`), or images the model cannot take."""
    if data is None:
        raise ValueError(
            "this matcher needs data: pass a TensorSplit (hf_permerge.data.load_tensors), or align "
            "through PermMerger.align(dataset), which converts a datasets.Dataset"
        )
    if all(hasattr(data, a) for a in ("input_ids", "attention_mask", "fingerprint", "subset")):
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is None:
            raise ValueError(
                f"token ids cannot be matched on {type(model).__name__}, which takes no tokens; align it on images"
            )
        return
    if not all(hasattr(data, a) for a in ("pixel_values", "labels", "fingerprint", "subset")):
        raise TypeError(
            f"cannot use {type(data).__name__} as matching data; pass a hf_permerge.data.TensorSplit: "
            "convert a datasets.Dataset with hf_permerge.merging.as_tensor_split(dataset, model), or "
            "align through PermMerger.align(dataset), which converts it"
        )
    if not fits(data.pixel_values, model):
        raise ValueError(
            f"images of shape {tuple(data.pixel_values.shape[1:])} do not fit the model, which "
            f"takes (channels, height, width) = {input_shape_text(model)}; bring the images to that size "
            "and number of channels (e.g. ds.map with PIL's Image.resize and Image.convert('L' or "
            "'RGB')), or align on the data the nets were trained on"
        )


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Eval mode for the duration (BatchNorm uses, and never updates, its running statistics)."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
