"""The matcher interface, the registry of matchers by name, and what every matcher shares.

A matcher aligns model_b ONTO model_a: model_a is the reference and stays as it is;
`matcher.match(model_a, model_b, data).apply(model_b)` lines up unit by unit with model_a.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import ClassVar, Iterator, Mapping

import torch
from torch import nn

from ..data.tensors import (TensorSplit, check_image_dataset, dataset_to_arrays, fingerprint_arrays, normalise,
                            processed_split)
from ..matching import MATCHER_SETTINGS, settings_for
from .hungarian import matched_similarity
from .permutations import Permutations
from .spec import PermutationSpec

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Matcher:
    """Base class: settings are the dataclass fields (constructor kwargs), `name` is the registry key."""

    name: ClassVar[str] = ""

    @property
    def settings(self) -> dict:
        return dataclasses.asdict(self)

    def match(self, model_a: nn.Module, model_b: nn.Module, data=None) -> Permutations:  # pragma: no cover
        raise NotImplementedError

    def _info(self, similarities: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor],
              data: TensorSplit | None) -> dict:
        """The header a `Permutations` carries: matcher, settings, data, and per group the summed
        similarity of the identity matching next to that of the matching found."""
        groups = {g: {"similarity_identity": matched_similarity(s, torch.arange(len(s))),
                      "similarity_matched": matched_similarity(s, perms[g])} for g, s in similarities.items()}
        data_info = None if data is None else {"fingerprint": data.fingerprint, "num_examples": len(data)}
        return {"matcher": self.name, "settings": self.settings, "data": data_info, "groups": groups}


MATCHERS: dict[str, type[Matcher]] = {}


def register_matcher(cls: type[Matcher]) -> type[Matcher]:
    """Register a matcher class under its name; a built-in one is named in `hf_permerge.matching`'s registry,
    whose settings model its fields must cover."""
    declared = MATCHER_SETTINGS.get(cls.name)
    if declared is not None:
        missing = set(declared.model_fields) - {f.name for f in dataclasses.fields(cls)}
        if missing:
            raise TypeError(f"matcher {cls.name!r} lacks the settings its model declares: {sorted(missing)}")
    MATCHERS[cls.name] = cls
    return cls


def get_matcher(name: str, **settings) -> Matcher:
    """`get_matcher("activation", similarity="correlation")` -> a configured matcher."""
    from . import activation, gradient, weight  # noqa: F401  (importing registers the built-in matchers)

    if name not in MATCHERS:
        raise ValueError(f"unknown matcher {name!r}; choose one of {sorted(MATCHERS)}")
    cls = MATCHERS[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ValueError(f"matcher {name!r} has no setting(s) {unknown}; its settings are {fields}")
    return cls(**settings)


def matcher_settings(name: str, values: Mapping) -> dict:
    """The entries of `values` (a config section, parsed CLI options) that are settings of matcher `name` (its
    model in `hf_permerge.matching`); None means "not given", so the matcher's default applies."""
    return settings_for(name, values)


def check_choice(setting: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{setting}={value!r} is not supported; choose one of {list(choices)}")


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> PermutationSpec:
    """The shared spec of two nets, or a ValueError naming how they differ."""
    for which, m in (("model_a", model_a), ("model_b", model_b)):
        if not hasattr(m, "permutation_spec"):
            raise TypeError(f"{which} ({type(m).__name__}) does not declare a permutation spec; "
                            "use one of the hf_permerge model classes, or give it a traced spec: "
                            "hf_permerge.alignment.attach_permutation_spec(model, on_unsupported='skip')")
    if type(model_a) is not type(model_b):
        raise ValueError(f"cannot match nets of different types: {type(model_a).__name__} vs {type(model_b).__name__}")
    spec_a, spec_b = model_a.permutation_spec(), model_b.permutation_spec()
    if spec_a != spec_b:
        desc = lambda s: [(g.name, g.size) for g in s.groups]  # noqa: E731
        raise ValueError(f"cannot match nets of different architectures: groups (name, width) "
                         f"{desc(spec_a)} vs {desc(spec_b)}")
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    spec_a.validate(sd_a)
    for key, t in sd_a.items():
        if key not in sd_b or sd_b[key].shape != t.shape:
            other = tuple(sd_b[key].shape) if key in sd_b else "missing"
            raise ValueError(f"cannot match nets of different architectures: {key!r} has shape "
                             f"{tuple(t.shape)} in model_a and {other} in model_b")
    return spec_a


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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


def _class_key(name: str) -> str:
    """A class name as folders and configs may both spell it: 'T - shirt / top' and 'T-shirt_top' alike."""
    return "".join(c for c in str(name).lower() if c.isalnum())


def _in_model_label_ids(ds, model: nn.Module, split: TensorSplit) -> TensorSplit:
    """The data's labels as the model's class ids: a `ClassLabel` whose names are among the model's `id2label`
    names, in another order or only some of them (a folder of images numbers its classes alphabetically from 0),
    is renumbered by name; other names are left as they are, with a warning."""
    names = getattr(ds.features.get("label"), "names", None)
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    ours = [id2label[i] for i in sorted(id2label)]
    if not names or not ours or all(str(n).startswith("LABEL_") for n in ours):
        return split
    theirs, by_key = [_class_key(n) for n in names], {_class_key(n): i for i, n in enumerate(ours)}
    if theirs == [_class_key(n) for n in ours]:
        return split
    if not set(theirs) <= set(by_key) or len(set(theirs)) != len(theirs):
        logger.warning("the data's classes %s are not among the models' %s; their label ids are used as they are",
                       list(names)[:12], ours[:12])
        return split
    mapping = torch.tensor([by_key[k] for k in theirs], device=split.labels.device)
    labels = torch.where(split.labels >= 0, mapping[split.labels.clamp(min=0)], split.labels)
    logger.info("the data's classes are among the models' (in another order, or some of them); labels renumbered "
                "by class name")
    return TensorSplit(split.pixel_values, labels, split.fingerprint)


def _from_dataset(ds, model: nn.Module, processor) -> TensorSplit:
    """Our models' own normalisation, in one vectorised pass, when the images already have the model's shape;
    otherwise the model's image processor (resize, channels, normalisation), one batch of images at a time.
    Labels are given in the model's class ids (`_in_model_label_ids`)."""
    return _in_model_label_ids(ds, model, _pixels_from_dataset(ds, model, processor))


def _pixels_from_dataset(ds, model: nn.Module, processor) -> TensorSplit:
    check_image_dataset(ds)                       # a schema error names its own fix, whichever path follows
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "image_mean"):
        try:
            images, labels = dataset_to_arrays(ds)
        except ValueError:                        # images of several sizes: the processor resizes them
            if processor is None:
                raise
        else:
            split = TensorSplit(normalise(images, cfg.image_mean, cfg.image_std), torch.from_numpy(labels),
                                fingerprint_arrays(images, labels))
            if processor is None or fits(split.pixel_values, model):
                return split
    if processor is None:
        raise ValueError(f"cannot preprocess a datasets.Dataset for {type(model).__name__}: its config records "
                         "no normalisation and no image processor was found beside it; save the model's image "
                         "processor in each model's folder (processor.save_pretrained(folder)); in Python you may "
                         "instead pass it (PermMerger.from_pretrained(..., image_processor=...)) or pass "
                         "preprocessed pixels as hf_permerge.data.TensorSplit(pixel_values, labels, fingerprint)")
    try:
        return processed_split(ds, processor)
    except (ValueError, TypeError) as err:
        raise ValueError(f"the image processor of {type(model).__name__} ({type(processor).__name__}) could not "
                         f"process the dataset's images: {err}; bring the images to the mode and size the model "
                         "was trained on") from err


def as_tensor_split(data, model: nn.Module, processor=None) -> TensorSplit:
    """A TensorSplit, or a `datasets.Dataset` ('image', optionally 'label') -> a TensorSplit.

    A `datasets.Dataset` is normalised with the model's own `image_mean` / `image_std` (our models: the
    normalisation they were trained with) or goes through `processor`, the model's image processor.
    """
    if data is None:
        raise ValueError("this matcher needs data: pass a TensorSplit (hf_permerge.data.load_tensors) "
                         "or a datasets.Dataset with an 'image' column")
    if isinstance(data, TensorSplit):
        split = data
    elif hasattr(data, "column_names"):
        split = _from_dataset(data, model, processor)
    else:
        raise TypeError(f"cannot use {type(data).__name__} as matching data; pass a TensorSplit or a "
                        "datasets.Dataset")
    if not fits(split.pixel_values, model):
        raise ValueError(f"images of shape {tuple(split.pixel_values.shape[1:])} do not fit the model, which "
                         f"takes (channels, height, width) = {input_shape_text(model)}; bring the images to that size and number "
                         "of channels (e.g. ds.map with PIL's Image.resize and Image.convert('L' or 'RGB')), "
                         "or align on the data the nets were trained on")
    return split


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
