"""Merging: PermMerger (align, merge, merge_all, permuted, save, push)."""

from .inputs import as_tensor_split
from .merger import PermMerger, average_state_dicts, check_same_architecture

__all__ = ["PermMerger", "as_tensor_split", "average_state_dicts", "check_same_architecture"]
