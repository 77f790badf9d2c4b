"""Causal language models of any `transformers` architecture: the config named by its model type
(`AutoConfig.for_model`), the model from `AutoModelForCausalLM.from_config` (never remote code), its init seeded.

What the data decides is not the user's to set: the vocabulary size and the special tokens' ids come from the
tokenizer, and the positions (`max_position_embeddings`) default to the block size.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any

import torch

DATA_KEYS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
"""Config keys set from the tokenizer (`data.vocab_size`), refused in `model.config`."""
EXTRA_KEYS = ("attn_implementation",)
"""Accepted by every config though not one of its fields."""


def config_class(model_type: str):
    """The config class of `model_type`, which must name a transformers causal LM."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ValueError(
            f"model.model_type: {model_type!r} is not a transformers architecture ({hint}e.g. llama, gpt2, qwen2)"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"model.model_type: {model_type!r} has no causal-LM head in transformers (AutoModelForCausalLM); "
            "choose a decoder such as llama, gpt2, qwen2, mistral"
        )
    return CONFIG_MAPPING[model_type]


def config_keys(model_type: str) -> set[str]:
    """The keys a config of `model_type` (a transformers architecture) takes: its fields, their aliases (`attribute_map`) and its init's
    arguments."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    keys = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    keys |= set(getattr(cls, "attribute_map", {}))
    keys |= {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")}
    return keys | set(EXTRA_KEYS)


def one_line(err: Exception) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def causal_lm_config(
    model_type: str,
    fields: dict[str, Any],
    vocab_size: int = 2048,
    special_token_id: int = 0,
    block_size: int | None = None,
):
    """The config of a `model_type` causal LM with `fields`; its vocabulary and special tokens from the tokenizer,
    its positions at least `block_size`. A key it does not know, or a value it refuses, is a ValueError naming
    `model.config.<key>`."""
    from transformers import AutoConfig

    config_class(model_type)
    known = config_keys(model_type)
    for key in fields:
        if key in DATA_KEYS:
            raise ValueError(
                f"model.config.{key} is set from the tokenizer; "
                + ("set data.vocab_size instead" if key == "vocab_size" else "drop it (the end-of-text token's id)")
            )
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"model.config.{key}: not a key of {model_type}'s config{hint}")
    ids = {k: special_token_id for k in DATA_KEYS[1:]}
    try:
        config = AutoConfig.for_model(model_type, **{**fields, "vocab_size": vocab_size, **ids})
    except Exception as err:  # the strict config classes raise their own errors (huggingface_hub's), among others
        message = one_line(err)
        key = next((k for k in fields if f"'{k}'" in message or f" {k} " in message), None)
        raise ValueError(f"model.config{'.' + key if key else ''}: {message}") from None
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv_heads, int) and (kv_heads < 1 or heads % kv_heads):
        raise ValueError(
            f"model.config.num_key_value_heads: {kv_heads} must divide num_attention_heads ({heads}): each key/value "
            "head serves a whole group of query heads"
        )
    if block_size is not None and hasattr(config, "max_position_embeddings"):
        given = next((fields[k] for k in ("max_position_embeddings", _alias(config)) if k in fields), None)
        if given is not None and given < block_size:
            raise ValueError(
                f"model.config.max_position_embeddings {given} is shorter than data.block_size {block_size}; "
                "raise it or drop it (it defaults to the block size)"
            )
        if given is None:
            config.max_position_embeddings = block_size
    return config


def _alias(config) -> str:
    """The config's own name for max_position_embeddings (GPT-2: n_positions)."""
    return getattr(config, "attribute_map", {}).get("max_position_embeddings", "max_position_embeddings")


def build_causal_lm(config, seed: int):
    """`AutoModelForCausalLM.from_config(config)` with its init drawn from `seed` alone (torch's global generator
    is put back as it was)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)
