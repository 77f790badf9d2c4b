"""The paper's fully connected network as a transformers image classifier."""
from __future__ import annotations

import torch
from torch import nn

from ..alignment.spec import PermGroup, PermutationSpec
from .configuration_perm_mlp import PermMLPConfig
from .modeling_base import PermPreTrainedModel


class PermMLPForImageClassification(PermPreTrainedModel):
    """Flatten -> [Linear -> ReLU] x depth -> Linear. Takes `pixel_values` (N, C, H, W)."""

    config_class = PermMLPConfig

    def __init__(self, config: PermMLPConfig):
        super().__init__(config)
        d_in = config.num_channels * config.image_size * config.image_size
        widths = [d_in] + [config.width] * config.depth
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=config.bias) for a, b in zip(widths[:-1], widths[1:]))
        self.activations = nn.ModuleList(nn.ReLU() for _ in range(config.depth))
        self.classifier = nn.Linear(config.width, config.num_labels, bias=config.bias)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, return_dict=None, **kwargs):
        h = pixel_values.flatten(1)
        for layer, act in zip(self.layers, self.activations):
            h = act(layer(h))
        return self._output(self.classifier(h), labels, return_dict)

    def permutation_spec(self) -> PermutationSpec:
        groups = []
        depth = self.config.depth
        for i in range(depth):
            nxt = f"layers.{i + 1}" if i + 1 < depth else "classifier"
            axes = [(f"layers.{i}.weight", 0)]
            if self.config.bias:
                axes.append((f"layers.{i}.bias", 0))
            axes.append((f"{nxt}.weight", 1))
            groups.append(PermGroup(f"hidden.{i}", self.config.width, tuple(axes),
                                    activation=f"activations.{i}", preactivation=f"layers.{i}"))
        return PermutationSpec(tuple(groups))
