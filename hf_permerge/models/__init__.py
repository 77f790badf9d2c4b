"""Model classes, registered with the Auto classes on import (no trust_remote_code)."""

from transformers import AutoConfig, AutoModelForImageClassification

from .configuration_perm_cnn import PermCNNConfig
from .configuration_perm_mlp import PermMLPConfig
from .modeling_perm_cnn import PermCNNForImageClassification
from .modeling_perm_mlp import PermMLPForImageClassification

AutoConfig.register(PermMLPConfig.model_type, PermMLPConfig, exist_ok=True)
AutoConfig.register(PermCNNConfig.model_type, PermCNNConfig, exist_ok=True)
AutoModelForImageClassification.register(PermMLPConfig, PermMLPForImageClassification, exist_ok=True)
AutoModelForImageClassification.register(PermCNNConfig, PermCNNForImageClassification, exist_ok=True)

__all__ = ["PermMLPConfig", "PermCNNConfig", "PermMLPForImageClassification", "PermCNNForImageClassification"]

from .image_processing_perm import register_image_processor  # noqa: E402

register_image_processor()
