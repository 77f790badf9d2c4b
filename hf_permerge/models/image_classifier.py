"""Image classifiers of any `transformers` architecture (ResNet, ViT, ConvNeXt, ...): the config named by its model
type (`AutoConfig.for_model`), the model from `AutoModelForImageClassification.from_config` (never remote code),
its init seeded, its widths scaled by one multiplier.

What the data decides is not the user's to set: the channels, the image size, the classes and their names come
from the data set; the input normalisation is recorded in the config (`image_mean`, `image_std`), as our own
image classifiers record theirs, so the data path and the image processor feed the model what it was trained on.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch

from .causal_lm import config_keys, one_line

DATA_KEYS = ("num_labels", "id2label", "label2id", "num_channels", "image_size")
"""Config keys set from the data set (`data.dataset`), refused in `model.config`."""

WIDTH_KEYS = {
    "resnet": ("embedding_size", "hidden_sizes"),
    "vit": ("hidden_size", "intermediate_size"),
    "convnext": ("hidden_sizes",),
}
"""The config fields `model.width_multiplier` scales, by model type: every layer's width, not its depth."""


def is_image_classifier(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES


def check_model_type(model_type: str) -> None:
    """`model_type` names a transformers causal LM or image classifier; else a ValueError naming the nearest."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    )

    known = [*MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, *MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES]
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, known, n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ValueError(
            f"model.model_type: {model_type!r} is not a transformers architecture ({hint}e.g. llama, gpt2, qwen2; "
            "an image classifier: resnet, vit, convnext)"
        )
    if model_type not in known:
        raise ValueError(
            f"model.model_type: {model_type!r} has neither a causal-LM head (AutoModelForCausalLM) nor an "
            "image-classification head (AutoModelForImageClassification) in transformers; choose a decoder such as "
            "llama, gpt2, qwen2, or an image classifier such as resnet, vit, convnext"
        )


def image_config_class(model_type: str):
    """The config class of `model_type`, which must name a transformers image classifier."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES), n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ValueError(
            f"model.model_type: {model_type!r} is not a transformers architecture ({hint}e.g. resnet, vit, convnext)"
        )
    if not is_image_classifier(model_type):
        raise ValueError(
            f"model.model_type: {model_type!r} has no image-classification head in transformers "
            "(AutoModelForImageClassification); choose e.g. resnet, vit, convnext"
        )
    return CONFIG_MAPPING[model_type]


def _scaled(value, multiplier: float):
    if isinstance(value, (list, tuple)):
        return [_scaled(v, multiplier) for v in value]
    return max(1, round(value * multiplier))


def image_classifier_config(
    model_type: str,
    fields: dict[str, Any],
    width_multiplier: float = 1,
    num_channels: int = 1,
    image_size: int = 28,
    class_names: tuple[str, ...] = tuple(str(i) for i in range(10)),
    image_mean: tuple[float, ...] | None = None,
    image_std: tuple[float, ...] | None = None,
):
    """The config of a `model_type` image classifier with `fields`, its widths (`WIDTH_KEYS`) times
    `width_multiplier`, its input and labels from the data. A key it does not know, or a value it refuses, is a
    ValueError naming `model.config.<key>` (or `model.width_multiplier`)."""
    from transformers import AutoConfig

    image_config_class(model_type)
    known = config_keys(model_type)
    for key in fields:
        if key in DATA_KEYS:
            raise ValueError(f"model.config.{key} is set from the data set (data.dataset); drop it")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"model.config.{key}: not a key of {model_type}'s config{hint}")
    if width_multiplier != 1 and model_type not in WIDTH_KEYS:
        raise ValueError(
            f"model.width_multiplier: scales the widths of {', '.join(WIDTH_KEYS)}, not {model_type}; "
            f"set {model_type}'s widths in model.config instead"
        )
    data = dict(
        num_channels=num_channels,
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={n: i for i, n in enumerate(class_names)},
        problem_type="single_label_classification",
    )
    try:
        config = AutoConfig.for_model(model_type, **{**fields, **data})
    except Exception as err:  # the strict config classes raise their own errors (huggingface_hub's), among others
        message = one_line(err)
        key = next((k for k in fields if f"'{k}'" in message or f" {k} " in message), None)
        raise ValueError(f"model.config{'.' + key if key else ''}: {message}") from None
    config.image_size = image_size  # ViT's input size; for any model, what the image processor resizes to
    if image_mean is not None:
        config.image_mean, config.image_std = list(image_mean), list(image_std)
    for key in WIDTH_KEYS.get(model_type, ()) if width_multiplier != 1 else ():
        setattr(config, key, _scaled(getattr(config, key), width_multiplier))
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if isinstance(heads, int) and isinstance(hidden, int) and (heads < 1 or hidden % heads):
        where = "model.width_multiplier" if width_multiplier != 1 else "model.config.hidden_size"
        raise ValueError(
            f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads} (each head takes an "
            f"equal share); choose a {'multiplier' if width_multiplier != 1 else 'hidden_size'} that keeps it so"
        )
    return config


def build_image_classifier(config, seed: int):
    """`AutoModelForImageClassification.from_config(config)` with its init drawn from `seed` alone (torch's global
    generator is put back as it was)."""
    from transformers import AutoModelForImageClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForImageClassification.from_config(config)
