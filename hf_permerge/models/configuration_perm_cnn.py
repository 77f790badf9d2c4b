"""Config of the paper's plain CNN (App. F.2): 3x3 convs, 2x2 average pools, global pool, linear read-out."""
from __future__ import annotations

from transformers import PretrainedConfig

from .configuration_perm_mlp import check_common


def parse_layers(layers: str) -> list[int | str]:
    """Parse the paper's notation, e.g. "64-64-avg-128-128" -> [64, 64, "avg", 128, 128]."""
    if not isinstance(layers, str) or not layers.strip():
        raise ValueError(f"layers must be a string such as '64-64-avg-128-128', got {layers!r}")
    out: list[int | str] = []
    for token in layers.strip().split("-"):
        if token == "avg":
            if not out or out[-1] == "avg":
                raise ValueError(f"layers={layers!r}: 'avg' must follow a conv width, as in '64-64-avg-128-128'")
            out.append("avg")
        elif token.isdigit() and int(token) > 0:
            out.append(int(token))
        else:
            raise ValueError(
                f"layers={layers!r}: {token!r} is neither a positive channel count nor 'avg'; "
                "write it as the paper does, e.g. '64-64-avg-128-128' or '32-avg-64-avg-128'"
            )
    return out


class PermCNNConfig(PretrainedConfig):
    model_type = "perm_cnn"

    def __init__(self, layers: str = "64-64-avg-128-128", num_channels: int = 1, image_size: int = 28,
                 num_labels: int = 10, batch_norm: bool = False, bias: bool = False, init: str = "kaiming_normal",
                 loss: str = "cross_entropy", seed: int = 0, image_mean=(0.2860,), image_std=(0.3530,), **kwargs):
        self.layers = layers
        self.num_channels = int(num_channels)
        self.image_size = int(image_size)
        self.batch_norm = bool(batch_norm)
        self.bias = bool(bias)
        self.init = init
        self.loss = loss
        self.seed = int(seed)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        super().__init__(num_labels=num_labels, **kwargs)
        parse_layers(layers)
        check_common(self)

    @property
    def conv_widths(self) -> list[int]:
        return [t for t in parse_layers(self.layers) if t != "avg"]
