"""Data: `datasets.Dataset` for interchange, whole-split tensors on the device for the hot path."""

from .catalog import DATASETS, DatasetInfo, dataset_info
from .loading import load_image_dataset
from .tensors import TensorSplit, load_tensors, normalise, tensors_from_dataset

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "dataset_info",
    "load_image_dataset",
    "TensorSplit",
    "load_tensors",
    "normalise",
    "tensors_from_dataset",
]
