"""Data: `datasets.Dataset` for interchange, whole-split tensors on the device for the hot path (images as
normalised tensors, text as blocks of tokens)."""

from .catalog import DATASETS, DatasetInfo, dataset_info
from .loading import load_image_dataset
from .tensors import TensorSplit, load_tensors, normalise, tensors_from_dataset
from .text import TEXT_DATASETS, load_text_splits
from .tokens import TokenSplit, token_split

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "dataset_info",
    "load_image_dataset",
    "TensorSplit",
    "load_tensors",
    "normalise",
    "tensors_from_dataset",
    "TEXT_DATASETS",
    "TokenSplit",
    "token_split",
    "load_text_splits",
]
