"""Text as tensors: a `datasets.Dataset` of token ids (or of text, through the model's own tokenizer) becomes one
padded tensor of ids and one of its attention mask, made once; batches are index slices. The training text of
language models (`data.text`: packed blocks, no padding) is a `TokenSplit` too."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import torch


@dataclass
class TokenSplit:
    """Sequences on the device: `input_ids` (N, L) int64 and `attention_mask` (N, L) (1: a token, 0: padding).

    Statistics count the tokens the mask keeps; every token is a sample of each unit it reaches. Training text
    also carries the `tokenizer` it was made with and the `documents` (books) it holds."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    fingerprint: str
    tokenizer: object = None
    documents: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def subset(self, n: int | None, seed: int = 0) -> TokenSplit:
        """A fixed random subset of n sequences (all when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].to(self.input_ids.device)
        return replace(
            self,
            input_ids=self.input_ids[idx],
            attention_mask=self.attention_mask[idx],
            fingerprint=f"{self.fingerprint}:subset{n}@{seed}",
        )

    def to(self, device) -> TokenSplit:
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device))

    def batches(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels (N, B, L) of N nets' training batches, idx (N, B), in one gather. The labels are the
        inputs: a causal LM shifts them itself (`labels=input_ids`). For packed blocks (no padding)."""
        ids = self.input_ids.index_select(0, idx.flatten()).view(*idx.shape, self.input_ids.shape[1])
        return ids, ids

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as (inputs, labels), as a causal LM's forward takes them (packed blocks)."""
        return self.input_ids, self.input_ids

    def to_dataset(self):
        """The sequences as a `datasets.Dataset` with `input_ids` (int32 lists) and `attention_mask`: what
        `token_split` reads back, and `PermMerger.align(dataset)` takes."""
        import datasets  # keep lazy: +1.2 s at import

        length = self.input_ids.shape[1]
        column = datasets.Sequence(datasets.Value("int32"), length=length)
        features = datasets.Features({"input_ids": column, "attention_mask": column})
        data = {k: getattr(self, k).cpu().numpy().astype("int32") for k in features}
        return datasets.Dataset.from_dict(data, features=features)

    def model_inputs(self, rows: slice) -> dict[str, torch.Tensor]:
        """The keyword arguments of a forward pass over sequences `rows`."""
        return {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows]}

    def token_mask(self, rows: slice) -> torch.Tensor:
        """(rows, L) bool: which positions are tokens (statistics skip padding)."""
        return self.attention_mask[rows].bool()


def check_text_columns(ds, text_column: str | None) -> str | None:
    """The column to read: `input_ids` when the data set has it, else the named text column; a one-line error
    listing the columns when it has neither."""
    columns = list(ds.column_names)
    if "input_ids" in columns and text_column is None:
        return None
    name = text_column or ("text" if "text" in columns else None)
    if name is None or name not in columns:
        wanted = f"text column {text_column!r}" if text_column else "'input_ids' or 'text' column"
        raise ValueError(
            f"the data set has no {wanted}; its columns are {columns}: name the text column (--text-column / "
            "text_column=...), or tokenize it into input_ids with the models' tokenizer"
        )
    return name


def _token_ids(row, i: int) -> list[int]:
    """Row `i` of `input_ids` as a list of ints; ids stored as strings or floats are refused naming the row."""
    values = row.tolist() if hasattr(row, "tolist") else list(row) if isinstance(row, (list, tuple)) else None
    if values is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        shown = (
            type(row).__name__ if values is None else type(next(v for v in values if not isinstance(v, int))).__name__
        )
        raise ValueError(
            f"input_ids row {i} holds {shown} values, not token ids (lists of ints): tokenize the text with the "
            "models' tokenizer, or give the text itself with --text-column / text_column=..."
        )
    return values


def token_split(
    ds,
    tokenizer=None,
    text_column: str | None = None,
    max_length: int | None = None,
    vocab_size: int | None = None,
    pad_id: int = 0,
) -> TokenSplit:
    """A `datasets.Dataset` with `input_ids` (and optionally `attention_mask`), or with a text column tokenized by
    `tokenizer` (the one saved beside the models), as a right-padded `TokenSplit`.

    Refused in one line, before any work: no such column; text without a tokenizer; a sequence longer than
    `max_length` (the model's positions); ids outside `vocab_size` (a tokenizer of another model)."""
    column = check_text_columns(ds, text_column)
    if column is not None:
        if tokenizer is None:
            raise ValueError(
                f"the data set holds text ({column!r}) and no tokenizer was saved beside the models: save the "
                "models' tokenizer beside them (tokenizer.save_pretrained(folder)), or pass input_ids"
            )
        texts = [t for t in ds[column] if isinstance(t, str) and t.strip()]
        if not texts:
            raise ValueError(
                f"the data set's {column!r} column holds no text (every row is empty or not a string); give text"
            )
        encoded = tokenizer(texts, add_special_tokens=True, truncation=max_length is not None, max_length=max_length)
        sequences = encoded["input_ids"]
        masks = None
    else:
        sequences = ds["input_ids"]
        masks = ds["attention_mask"] if "attention_mask" in ds.column_names else None
    sequences = [_token_ids(s, i) for i, s in enumerate(sequences)]
    if not sequences or not any(sequences):
        raise ValueError("the data set holds no tokens: every sequence is empty")
    longest = max(len(s) for s in sequences)
    if max_length is not None and longest > max_length:
        raise ValueError(
            f"a sequence of {longest} tokens is longer than the models' {max_length} positions: split the text into "
            f"blocks of at most {max_length} tokens (or pass text with --text-column, which truncates)"
        )
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):  # once, at the edge; the hot path is index slices of these tensors
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = torch.as_tensor(masks[i], dtype=torch.long) if masks is not None else 1
    if int(ids.min()) < 0:
        raise ValueError(
            f"token id {int(ids.min())} is negative: token ids count from 0; tokenize the text with the models' "
            "own tokenizer (and pad with its pad id, not -100: the attention mask marks padding)"
        )
    if vocab_size is not None and int(ids.max()) >= vocab_size:
        raise ValueError(
            f"token id {int(ids.max())} is outside the models' vocabulary of {vocab_size}: the data was tokenized "
            "with another model's tokenizer; tokenize it with the merged models' own"
        )
    digest = hashlib.sha256(ids.numpy().tobytes() + mask.numpy().tobytes()).hexdigest()[:16]
    return TokenSplit(ids, mask, f"tokens:{digest}")


def model_token_split(
    ds, tokenizer, config, text_column: str | None = None, num_examples: int | None = None, seed: int = 0
) -> TokenSplit:
    """`token_split` for the model a transformers `config` describes (its positions, vocabulary and pad id), of a
    seeded subset of `num_examples` sequences of `ds` (all when None)."""
    from .tensors import subset_indices

    if num_examples is not None and num_examples < len(ds):
        ds = ds.select(subset_indices(len(ds), num_examples, seed).tolist())
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    positions = int(positions) if isinstance(positions, int) else None
    pad = config.pad_token_id if isinstance(getattr(config, "pad_token_id", None), int) else 0
    return token_split(ds, tokenizer, text_column, positions, config.vocab_size, pad)
