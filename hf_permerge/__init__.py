"""hf_permerge: permutation-aware model merging for the Hugging Face ecosystem."""
from .models import (PermCNNConfig, PermCNNForImageClassification, PermMLPConfig,
                     PermMLPForImageClassification)

__version__ = "0.1.0"

__all__ = ["PermMLPConfig", "PermCNNConfig", "PermMLPForImageClassification", "PermCNNForImageClassification"]
