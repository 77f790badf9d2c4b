"""Config of the paper's plain CNN (App. F.2): 3x3 convs, 2x2 average pools, global pool, linear read-out."""

from __future__ import annotations

from .configuration_perm_mlp import PermImageConfig, check_common


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


class PermCNNConfig(PermImageConfig):
    """The paper's plain CNN, `layers` in its notation ("64-64-avg-128-128"), BatchNorm after each conv if asked."""

    model_type = "perm_cnn"

    layers: str = "64-64-avg-128-128"
    batch_norm: bool = False

    def __post_init__(self, **kwargs):
        self.batch_norm = bool(self.batch_norm)
        super().__post_init__(**kwargs)
        parse_layers(self.layers)
        check_common(self)

    @property
    def conv_widths(self) -> list[int]:
        return [t for t in parse_layers(self.layers) if t != "avg"]
