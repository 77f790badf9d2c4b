"""The paper's fully connected network as a transformers image classifier."""

from __future__ import annotations

import torch
from torch import nn

from ..alignment.spec import PermGroup, PermutationSpec
from .configuration_perm_mlp import PermMLPConfig
from .modeling_base import PermPreTrainedModel


def mlp_layer_names(depth: int) -> list[str]:
    """The linear layers of a PermMLP of `depth` hidden layers, in forward order."""
    return [f"layers.{i}" for i in range(depth)] + ["classifier"]


def mlp_forward(linear, relu, names: list[str], h):
    """The PermMLP forward, written once: `linear(name, h)` for each layer in `names` order, with `relu(i, h)`
    after every layer but the classifier. The model passes its own modules (so hooks on them see every
    activation); the stacked training engine and the interpolation curves pass batched matmuls over many nets'
    parameters. The float64 engine tests check that all of them compute the model's function."""
    for i, name in enumerate(names):
        h = linear(name, h)
        if i + 1 < len(names):
            h = relu(i, h)
    return h


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
        logits = mlp_forward(
            lambda name, h: self.get_submodule(name)(h),
            lambda i, h: self.activations[i](h),
            mlp_layer_names(self.config.depth),
            pixel_values.flatten(1),
        )
        return self._output(logits, labels, return_dict)

    def permutation_spec(self) -> PermutationSpec:
        groups = []
        depth = self.config.depth
        for i in range(depth):
            nxt = f"layers.{i + 1}" if i + 1 < depth else "classifier"
            axes = [(f"layers.{i}.weight", 0)]
            if self.config.bias:
                axes.append((f"layers.{i}.bias", 0))
            axes.append((f"{nxt}.weight", 1))
            groups.append(
                PermGroup(
                    f"hidden.{i}",
                    self.config.width,
                    tuple(axes),
                    activation=f"activations.{i}",
                    preactivation=f"layers.{i}",
                )
            )
        return PermutationSpec(tuple(groups))
