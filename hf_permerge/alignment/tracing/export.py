"""The model as one exported call: example inputs, the wrapper `torch.export` traces, module paths."""

from __future__ import annotations

import torch
from torch import nn

from ..base import input_shape

EXAMPLE_TOKENS = 16
"""Sequence length of a text model's example inputs (or its maximum number of positions, if fewer)."""


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence a text model's config allows (None where it records no limit)."""
    cfg = getattr(model, "config", None)
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(positions) if isinstance(positions, int) else None


def example_tokens(model: nn.Module, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor] | None:
    """Random `input_ids` for a text model (its config has a `vocab_size`), with an `attention_mask` whose second
    row ends in padding, so that tracing sees the padding mask too; None for a model without a vocabulary."""
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if not isinstance(vocab, int) or hasattr(cfg, "num_channels"):
        return None
    length = max(2, min(EXAMPLE_TOKENS, max_positions(model) or EXAMPLE_TOKENS))
    ids = torch.randint(0, vocab, (batch_size, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1:, length - length // 4 :] = 0
    p = next(model.parameters(), None)
    device = p.device if p is not None else "cpu"
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def example_inputs_for(model: nn.Module, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pixels shaped by the model's config (`num_channels`, `image_size`), keyed by its main input name;
    for a text model, random tokens (`example_tokens`)."""
    tokens = example_tokens(model, batch_size, seed)
    if tokens is not None:
        return tokens
    shape = input_shape(model)
    if shape is None or None in shape:
        raise ValueError(
            f"cannot guess example inputs for {type(model).__name__} (its config has no num_channels / "
            "image_size, nor a vocab_size); pass example_inputs=<a tensor, a tuple of positional args or a dict "
            "of kwargs>"
        )
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else "cpu"
    x = torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    return {getattr(model, "main_input_name", "pixel_values"): x}


def _as_call(model: nn.Module, example_inputs) -> tuple[tuple, dict]:
    if example_inputs is None:
        return (), example_inputs_for(model)
    if isinstance(example_inputs, torch.Tensor):
        name = getattr(model, "main_input_name", None)
        return ((), {name: example_inputs}) if name else ((example_inputs,), {})
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tensor, a tuple of positional args or a dict of kwargs, "
        f"got {type(example_inputs).__name__}"
    )


def _tensors(out) -> list[torch.Tensor]:
    """Every tensor in a model output (a tensor, tuple, list, dict or transformers ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # ModelOutput is an OrderedDict of its non-None fields
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


class _Call(nn.Module):
    """`model(*args, **kwargs)` with tensor kwargs passed positionally, returning the output's tensors."""

    def __init__(self, model: nn.Module, num_args: int, kw_names: tuple[str, ...], static: dict):
        super().__init__()
        self.model = model
        self.num_args, self.kw_names, self.static = num_args, kw_names, static

    def forward(self, *inputs):
        kwargs = dict(zip(self.kw_names, inputs[self.num_args :]), **self.static)
        return tuple(_tensors(self.model(*inputs[: self.num_args], **kwargs)))


def traceable_call(model: nn.Module, example_inputs) -> tuple[_Call, tuple]:
    args, kwargs = _as_call(model, example_inputs)
    tensor_kw = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    static = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    return _Call(model, len(args), tuple(tensor_kw), static), (*args, *tensor_kw.values())


def model_path(path: str) -> str:
    """Paths inside the `_Call` wrapper start with 'model.'; the model's own names do not."""
    return path[len("model.") :] if path.startswith("model.") else "" if path == "model" else path
