"""Build the HF model config/class for net i of a run config."""

from __future__ import annotations

from ..config import RunConfig
from ..data.catalog import dataset_info
from ..models import PermCNNConfig, PermCNNForImageClassification, PermMLPConfig, PermMLPForImageClassification
from .seeds import derive_seed


def model_config_for(config: RunConfig, net_index: int = 0):
    """The HF config of net `net_index`: architecture from `model`, input shape and labels from the data set."""
    info = dataset_info(config.data.dataset)
    m = config.model
    common = dict(
        num_channels=info.num_channels,
        image_size=info.image_size,
        num_labels=len(info.class_names),
        id2label={i: n for i, n in enumerate(info.class_names)},
        label2id={n: i for i, n in enumerate(info.class_names)},
        init=m.init,
        loss=m.loss,
        seed=derive_seed(config.training.seed, net_index, "init"),
        image_mean=config.data.mean_std()[0],
        image_std=config.data.mean_std()[1],
    )
    if m.bias is not None:
        common["bias"] = m.bias
    if m.type == "mlp":
        return PermMLPConfig(depth=m.depth, width=m.width, **common)
    return PermCNNConfig(layers=m.layers, batch_norm=m.batch_norm, **common)


def build_model(config: RunConfig, net_index: int = 0):
    cfg = model_config_for(config, net_index)
    cls = PermMLPForImageClassification if isinstance(cfg, PermMLPConfig) else PermCNNForImageClassification
    return cls(cfg)
