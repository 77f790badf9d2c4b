"""Merging: PermMerger (align, merge, merge_all, permuted, save, push)."""
from .merger import PermMerger, average_state_dicts, check_same_architecture

__all__ = ["PermMerger", "average_state_dicts", "check_same_architecture"]
