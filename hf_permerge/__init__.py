"""hf_permerge: permutation-aware model merging for the Hugging Face ecosystem.

Importing the package registers our model classes with `AutoConfig`,
`AutoModelForImageClassification` and `AutoImageProcessor` (no `trust_remote_code`).
"""
from .metrics import load_metric
from .models import PermCNNConfig, PermCNNForImageClassification, PermMLPConfig, PermMLPForImageClassification

__version__ = "0.1.0"


def __getattr__(name):
    """`hf_permerge.PermMerger` without importing the merging stack at start-up."""
    if name == "PermMerger":
        from .merging import PermMerger

        return PermMerger
    raise AttributeError(f"module 'hf_permerge' has no attribute {name!r}")


__all__ = ["PermMLPConfig", "PermCNNConfig", "PermMLPForImageClassification", "PermCNNForImageClassification",
           "PermMerger", "load_metric"]
