"""The merger's edge: whatever data a user gives (a `datasets.Dataset`, a folder read as one, tensors) becomes the
one form the matchers and REPAIR take, a `TensorSplit` normalised for the models, with their class ids."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..alignment.base import check_matching_data, fits
from ..data.loading import check_image_dataset
from ..data.tensors import TensorSplit, dataset_to_arrays, fingerprint_arrays, normalise, processed_split

logger = logging.getLogger(__name__)


def as_tensor_split(data, model: nn.Module, processor=None) -> TensorSplit:
    """A TensorSplit, or a `datasets.Dataset` ('image', optionally 'label') -> a TensorSplit.

    A `datasets.Dataset` is normalised with the model's own `image_mean` / `image_std` (our models: the
    normalisation they were trained with) or goes through `processor`, the model's image processor.
    """
    if hasattr(data, "column_names"):
        data = _from_dataset(data, model, processor)
    elif data is not None and not isinstance(data, TensorSplit):
        raise TypeError(f"cannot use {type(data).__name__} as matching data; pass a TensorSplit or a datasets.Dataset")
    check_matching_data(data, model)
    return data


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
        logger.warning(
            "the data's classes %s are not among the models' %s; their label ids are used as they are",
            list(names)[:12],
            ours[:12],
        )
        return split
    mapping = torch.tensor([by_key[k] for k in theirs], device=split.labels.device)
    labels = torch.where(split.labels >= 0, mapping[split.labels.clamp(min=0)], split.labels)
    logger.info(
        "the data's classes are among the models' (in another order, or some of them); labels renumbered by class name"
    )
    return TensorSplit(split.pixel_values, labels, split.fingerprint)


def _from_dataset(ds, model: nn.Module, processor) -> TensorSplit:
    """Our models' own normalisation, in one vectorised pass, when the images already have the model's shape;
    otherwise the model's image processor (resize, channels, normalisation), one batch of images at a time.
    Labels are given in the model's class ids (`_in_model_label_ids`)."""
    return _in_model_label_ids(ds, model, _pixels_from_dataset(ds, model, processor))


def _pixels_from_dataset(ds, model: nn.Module, processor) -> TensorSplit:
    check_image_dataset(ds)  # a schema error names its own fix, whichever path follows
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "image_mean"):
        try:
            images, labels = dataset_to_arrays(ds)
        except ValueError:  # images of several sizes: the processor resizes them
            if processor is None:
                raise
        else:
            split = TensorSplit(
                normalise(images, cfg.image_mean, cfg.image_std),
                torch.from_numpy(labels),
                fingerprint_arrays(images, labels),
            )
            if processor is None or fits(split.pixel_values, model):
                return split
    if processor is None:
        raise ValueError(
            f"cannot preprocess a datasets.Dataset for {type(model).__name__}: its config records "
            "no normalisation and no image processor was found beside it; save the model's image "
            "processor in each model's folder (processor.save_pretrained(folder)); in Python you may "
            "instead pass it (PermMerger.from_pretrained(..., image_processor=...)) or pass "
            "preprocessed pixels as hf_permerge.data.TensorSplit(pixel_values, labels, fingerprint)"
        )
    try:
        return processed_split(ds, processor)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"the image processor of {type(model).__name__} ({type(processor).__name__}) could not "
            f"process the dataset's images: {err}; bring the images to the mode and size the model "
            "was trained on"
        ) from err
