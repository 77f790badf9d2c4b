"""The paper's plain CNN (App. F.2) as a transformers image classifier."""

from __future__ import annotations

import torch
from torch import nn

from ..alignment.spec import PermGroup, PermutationSpec
from .configuration_perm_cnn import PermCNNConfig, parse_layers
from .modeling_base import PermPreTrainedModel


class ConvBlock(nn.Module):
    """conv3x3 -> [BatchNorm] -> ReLU -> pool. The block's output is its group's activation."""

    def __init__(self, c_in: int, c_out: int, bias: bool, batch_norm: bool, pool: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)
        self.norm = nn.BatchNorm2d(c_out) if batch_norm else nn.Identity()
        self.act = nn.ReLU()
        self.pool = pool

    def forward(self, x):
        return self.pool(self.act(self.norm(self.conv(x))))


class GlobalAvgPool(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


class PermCNNForImageClassification(PermPreTrainedModel):
    """Blocks as written in `config.layers`; the last block ends in a global average pool."""

    config_class = PermCNNConfig

    def __init__(self, config: PermCNNConfig):
        super().__init__(config)
        tokens = parse_layers(config.layers)
        blocks, c_in = [], config.num_channels
        for i, tok in enumerate(tokens):
            if tok == "avg":
                continue
            pooled = i + 1 < len(tokens) and tokens[i + 1] == "avg"
            last = all(t == "avg" for t in tokens[i + 1 :])
            pools = ([nn.AvgPool2d(2)] if pooled else []) + ([GlobalAvgPool()] if last else [])
            pool = nn.Identity() if not pools else pools[0] if len(pools) == 1 else nn.Sequential(*pools)
            blocks.append(ConvBlock(c_in, tok, config.bias, config.batch_norm, pool))
            c_in = tok
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(c_in, config.num_labels, bias=config.bias)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, return_dict=None, **kwargs):
        h = pixel_values
        for block in self.blocks:
            h = block(h)
        return self._output(self.classifier(h), labels, return_dict)

    def permutation_spec(self) -> PermutationSpec:
        groups = []
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            p = f"blocks.{i}"
            axes = [(f"{p}.conv.weight", 0)]
            if self.config.bias:
                axes.append((f"{p}.conv.bias", 0))
            if self.config.batch_norm:
                axes += [(f"{p}.norm.{k}", 0) for k in ("weight", "bias", "running_mean", "running_var")]
            axes.append((f"blocks.{i + 1}.conv.weight" if i + 1 < n else "classifier.weight", 1))
            pre = f"{p}.norm" if self.config.batch_norm else f"{p}.conv"
            groups.append(PermGroup(f"conv.{i}", block.conv.out_channels, tuple(axes), activation=p, preactivation=pre))
        return PermutationSpec(tuple(groups))
