"""Text for training causal language models: documents tokenized and packed into blocks of `block_size` tokens, a
split whole in memory as a `TokenSplit` (one (blocks, block_size) tensor; batches are index slices) and a
`datasets.Dataset` of `input_ids` for interchange. Tokenizer and blocks are cached on disk, keyed by a fingerprint
of the text and the settings.

Cache: `$HF_PERMERGE_CACHE/text/<name>-<fingerprint>/` (default `~/.cache/hf_permerge`), holding the tokenizer
(`tokenizer/`) and the blocks (`blocks/`, a `DatasetDict` with splits train and test, readable with
`datasets.load_from_disk`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..io_utils import atomic_dir
from .tokenizer import EOS_ID, train_tokenizer
from .tokens import TokenSplit

logger = logging.getLogger(__name__)

TEXT_DATASETS = ("kjv",)
CACHE_FORMAT = "hf_permerge.text/1"
"""Part of every cache key: a change to how text is tokenized or packed bumps it."""


def split_fingerprint(input_ids: torch.Tensor) -> str:
    return hashlib.sha256(input_ids.numpy().astype(np.int32).tobytes()).hexdigest()[:16]


def blocks_split(input_ids: torch.Tensor, tokenizer, documents: tuple[str, ...]) -> TokenSplit:
    """Packed blocks as a `TokenSplit`: every position a token (no padding)."""
    return TokenSplit(input_ids, torch.ones_like(input_ids), split_fingerprint(input_ids), tokenizer, documents)


def pack_blocks(tokenizer, documents: list[str], block_size: int) -> torch.Tensor:
    """Each document's tokens and an end-of-text token, concatenated and cut into rows of `block_size` (the tail
    shorter than a block is dropped)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False)
    flat = np.concatenate([np.append(np.asarray(e.ids, dtype=np.int64), EOS_ID) for e in encodings])
    blocks = len(flat) // block_size
    if blocks == 0:
        raise ValueError(f"the text holds {len(flat)} tokens, less than one block of {block_size}; lower block_size")
    return torch.from_numpy(flat[: blocks * block_size].reshape(blocks, block_size).copy())


def cache_root() -> Path:
    return Path(os.environ.get("HF_PERMERGE_CACHE") or Path.home() / ".cache" / "hf_permerge")


def _cache_key(name: str, train_docs, test_docs, vocab_size: int, block_size: int) -> str:
    import tokenizers

    h = hashlib.sha256()
    for part in (CACHE_FORMAT, tokenizers.__version__, name, str(vocab_size), str(block_size)):
        h.update(part.encode() + b"\0")
    for tag, docs in ((b"train", train_docs), (b"test", test_docs)):
        h.update(tag)
        for doc in docs:
            h.update(doc.encode() + b"\0")
    return h.hexdigest()[:16]


def _read_cache(folder: Path, names: dict[str, tuple[str, ...]]) -> tuple[TokenSplit, TokenSplit] | None:
    import datasets
    from transformers import PreTrainedTokenizerFast

    if not (folder / "blocks").is_dir():
        return None
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer", trust_remote_code=False)
        blocks = datasets.load_from_disk(str(folder / "blocks"))
        ids = {s: torch.from_numpy(blocks[s].with_format("numpy")[:]["input_ids"].astype(np.int64)) for s in names}
    except Exception as err:  # a damaged cache is made again, never fatal
        logger.warning("ignoring the damaged text cache %s (%s); tokenizing again", folder, err)
        return None
    return blocks_split(ids["train"], tokenizer, names["train"]), blocks_split(ids["test"], tokenizer, names["test"])


def _write_cache(folder: Path, train: TokenSplit, test: TokenSplit) -> None:
    import datasets

    shown = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # "Saving the dataset": a bar for a fraction of a second
    try:
        with atomic_dir(folder) as tmp:
            train.tokenizer.save_pretrained(tmp / "tokenizer")
            datasets.DatasetDict({"train": train.to_dataset(), "test": test.to_dataset()}).save_to_disk(
                str(tmp / "blocks")
            )
    except OSError as err:  # a read-only home: train without a cache
        logger.warning("could not cache the tokenized text in %s (%s)", folder, err)
    finally:
        if shown:
            datasets.enable_progress_bars()


_MEMORY: dict = {}


def tokenized_splits(
    name: str, train_docs: dict[str, str], test_docs: dict[str, str], vocab_size: int, block_size: int
) -> tuple[TokenSplit, TokenSplit]:
    """(train, test) blocks of documents {name: text}; the tokenizer is trained on `train_docs` only.
    Read from the cache when it holds them, else made and cached."""
    key = _cache_key(name, list(train_docs.values()), list(test_docs.values()), vocab_size, block_size)
    if key in _MEMORY:
        return _MEMORY[key]
    folder = cache_root() / "text" / f"{name}-{key}"
    names = {"train": tuple(train_docs), "test": tuple(test_docs)}
    splits = _read_cache(folder, names)
    if splits is None:
        tokenizer = train_tokenizer(train_docs.values(), vocab_size, model_max_length=block_size)
        train = blocks_split(pack_blocks(tokenizer, list(train_docs.values()), block_size), tokenizer, names["train"])
        test = blocks_split(pack_blocks(tokenizer, list(test_docs.values()), block_size), tokenizer, names["test"])
        _write_cache(folder, train, test)
        splits = train, test
    _MEMORY[key] = splits
    return splits


def load_text_splits(
    name: str, vocab_size: int, block_size: int, heldout_every: int, device="cpu"
) -> tuple[TokenSplit, TokenSplit]:
    """(train, held-out) blocks of text data set `name` on `device`, split by book (`kjv.split_books`)."""
    from .kjv import read_kjv, split_books

    if name not in TEXT_DATASETS:
        raise ValueError(f"unknown text dataset {name!r}; choose one of {list(TEXT_DATASETS)}")
    train_books, test_books = split_books(read_kjv(), heldout_every)
    train, test = tokenized_splits(
        name,
        {b.name: b.text() for b in train_books},
        {b.name: b.text() for b in test_books},
        vocab_size,
        block_size,
    )
    return train.to(device), test.to(device)
