"""What our two model classes share: the seeded init, the loss, the permutation-spec hook."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from ..alignment.spec import PermutationSpec


def _init_tensor(shape: torch.Size, scheme: str, generator: torch.Generator) -> torch.Tensor:
    """A fresh CPU tensor drawn from the config's init scheme (ReLU gain, fan_in)."""
    t = torch.empty(shape)
    if scheme == "kaiming_normal":
        nn.init.kaiming_normal_(t, mode="fan_in", nonlinearity="relu", generator=generator)
    elif scheme == "xavier":
        nn.init.xavier_normal_(t, generator=generator)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(t, gain=nn.init.calculate_gain("relu"), generator=generator)
    else:  # the config validates this; kept for direct callers
        raise ValueError(f"unknown init scheme {scheme!r}")
    return t


class PermPreTrainedModel(PreTrainedModel):
    """Base class: a seeded, bit-reproducible init that transformers' `post_init` cannot overwrite.

    transformers' `initialize_weights` (called by `post_init` and for keys missing from a
    checkpoint) would visit submodules one by one, and skips a custom model's root. We replace
    it: every parameter is drawn in state-dict order from one generator seeded by
    `config.seed`, so the same seed gives the same weights on any device. Parameters already
    loaded from a checkpoint (flagged `_is_hf_initialized`) are left alone.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules: list[str] = []

    def initialize_weights(self) -> None:
        self.reset_parameters_from_seed()

    def _init_weights(self, module: nn.Module) -> None:
        """Per-module init is never used: `initialize_weights` draws everything from the seed."""

    @torch.no_grad()
    def reset_parameters_from_seed(self, seed: int | None = None) -> None:
        generator = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
        for name, param in self.named_parameters():
            if param.device.type == "meta" or getattr(param, "_is_hf_initialized", False):
                continue
            if name.endswith("weight") and param.ndim >= 2:
                value = _init_tensor(param.shape, self.config.init, generator)
            elif ".norm." in name and name.endswith("weight"):
                value = torch.ones(param.shape)
            else:
                value = torch.zeros(param.shape)
            param.copy_(value.to(param.dtype))
        for name, buf in self.named_buffers():
            if buf.device.type == "meta" or getattr(buf, "_is_hf_initialized", False):
                continue  # BatchNorm statistics loaded from a checkpoint are kept, like parameters
            if name.endswith("running_mean"):
                buf.zero_()
            elif name.endswith("running_var"):
                buf.fill_(1.0)
            elif name.endswith("num_batches_tracked"):
                buf.zero_()

    def permutation_spec(self) -> PermutationSpec:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.example_losses(logits, labels).mean()

    def example_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of each example (any leading shape); the trainer averages them per net."""
        if self.config.loss == "mse":
            return F.mse_loss(logits, F.one_hot(labels, logits.shape[-1]).to(logits.dtype), reduction="none").mean(-1)
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)

    def _output(self, logits, labels, return_dict):
        loss = self.compute_loss(logits, labels) if labels is not None else None
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return ImageClassifierOutput(loss=loss, logits=logits)
