"""Build the HF model config/class for net i of a run config."""

from __future__ import annotations

from ..config import RunConfig, image_fields
from ..data.catalog import dataset_info
from ..data.tokenizer import EOS_ID
from ..models import PermCNNConfig, PermCNNForImageClassification, PermMLPConfig, PermMLPForImageClassification
from ..models.causal_lm import build_causal_lm, causal_lm_config
from ..models.image_classifier import build_image_classifier, image_classifier_config
from .seeds import derive_seed


def model_config_for(config: RunConfig, net_index: int = 0):
    """The HF config of net `net_index`: architecture from `model`, input shape, labels and normalisation (images)
    or vocabulary and special tokens (text: the tokenizer's, whose size is `data.vocab_size` and end-of-text id
    `EOS_ID` for any corpus) from the data set."""
    m, d = config.model, config.data
    if m.type == "transformers" and d.is_text:
        return causal_lm_config(m.model_type, m.config, d.vocab_size, EOS_ID, d.block_size)
    if m.type == "transformers":
        return image_classifier_config(m.model_type, m.config, m.width_multiplier, **image_fields(d))
    info = dataset_info(config.data.dataset)
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
    seed = derive_seed(config.training.seed, net_index, "init")
    if config.model.type == "transformers":
        build = build_causal_lm if config.data.is_text else build_image_classifier
        return build(cfg, seed)
    cls = PermMLPForImageClassification if isinstance(cfg, PermMLPConfig) else PermCNNForImageClassification
    return cls(cfg)
