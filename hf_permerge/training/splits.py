"""The training and test splits a run config names, whole on a device: images as normalised tensors, text as
blocks of tokens (the test split of text: the held-out books)."""

from __future__ import annotations

from ..config import RunConfig
from ..data.tensors import load_tensors
from ..data.text import load_text_splits


def load_splits(config: RunConfig, device="cpu"):
    """(train, test): `TensorSplit`s of images, or `TokenSplit`s of text sharing one tokenizer."""
    d = config.data
    if d.is_text:
        return load_text_splits(d.dataset, d.vocab_size, d.block_size, d.heldout_every, device)
    return (
        load_tensors(d.dataset, "train", device, d.data_dir, d.mean_std()),
        load_tensors(d.dataset, "test", device, d.data_dir, d.mean_std()),
    )
