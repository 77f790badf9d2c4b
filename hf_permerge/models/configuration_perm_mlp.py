"""Config of the paper's fully connected network (App. F.1)."""

from __future__ import annotations

from transformers import PreTrainedConfig

INITS = ("kaiming_normal", "xavier", "orthogonal")
LOSSES = ("cross_entropy", "mse")


def check_common(config) -> None:
    """Validate the fields our two model configs share; errors name the field and the allowed values."""
    if config.init not in INITS:
        raise ValueError(f"init={config.init!r} is not supported; choose one of {list(INITS)}")
    if config.loss not in LOSSES:
        raise ValueError(f"loss={config.loss!r} is not supported; choose one of {list(LOSSES)}")
    if len(config.image_mean) != config.num_channels or len(config.image_std) != config.num_channels:
        raise ValueError(
            f"image_mean/image_std need one value per channel ({config.num_channels}), "
            f"got {config.image_mean} / {config.image_std}"
        )


class PermImageConfig(PreTrainedConfig):
    """The fields our model configs share: the images they take, how they are initialised and trained (10 labels
    unless told otherwise). Values are stored as these types (a YAML 1 for a mean is a float)."""

    num_channels: int = 1
    image_size: int = 28
    bias: bool = False
    init: str = "kaiming_normal"
    loss: str = "cross_entropy"
    seed: int = 0
    image_mean: list[float] | tuple[float, ...] = (0.2860,)
    image_std: list[float] | tuple[float, ...] = (0.3530,)

    def __post_init__(self, **kwargs):
        kwargs.setdefault("num_labels", 10)
        self.num_channels, self.image_size, self.seed = int(self.num_channels), int(self.image_size), int(self.seed)
        self.bias = bool(self.bias)
        self.image_mean = [float(m) for m in self.image_mean]
        self.image_std = [float(s) for s in self.image_std]
        super().__post_init__(**kwargs)


class PermMLPConfig(PermImageConfig):
    """`depth` hidden ReLU layers of `width` units, then a linear read-out.

    `seed` fixes the initialisation bit-identically; `image_mean` / `image_std` record the
    input normalisation the data path applies, so any client can reproduce it.
    """

    model_type = "perm_mlp"

    depth: int = 2
    width: int = 512

    def __post_init__(self, **kwargs):
        self.depth, self.width = int(self.depth), int(self.width)
        super().__post_init__(**kwargs)
        if self.depth < 1 or self.width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={self.depth}, width={self.width}")
        check_common(self)
