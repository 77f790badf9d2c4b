"""The nets' tokenizers, compared before any work: a merge of models that read the same ids as different tokens
averages unrelated embeddings, and the output would carry only net 0's tokenizer. Same files are the same
tokenizer at once; otherwise both are loaded and compared by vocabulary (id -> token) and special tokens."""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
ALLOW = "allow_different_tokenizers=True"
"""The way out, in the Python call's words (`hub.cli_message` gives the flag's)."""


def _files(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}


def load_tokenizer(folder: Path):
    """The tokenizer saved in `folder` (never its code), or None when it holds none or it cannot be read."""
    if not _files(folder):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _tokens_by_id(vocab: dict[str, int]) -> dict[int, tuple[str, ...]]:
    """id -> its tokens (a vocabulary may give one id two names)."""
    out: dict[int, list[str]] = {}
    for token, i in vocab.items():
        out.setdefault(i, []).append(token)
    return {i: tuple(sorted(tokens)) for i, tokens in out.items()}


def _said(tokens) -> str:
    return "none" if tokens is None else " or ".join(repr(t) for t in tokens)


def tokenizer_difference(a, b) -> str | None:
    """How two tokenizers differ, in words (the first differing ids and how many differ), or None when they map
    every id to the same token and have the same special tokens."""
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if vocab_a != vocab_b:
        by_id_a, by_id_b = _tokens_by_id(vocab_a), _tokens_by_id(vocab_b)
        ids = sorted(set(by_id_a) | set(by_id_b))
        differ = [i for i in ids if by_id_a.get(i) != by_id_b.get(i)]
        shown = ", ".join(f"id {i}: {_said(by_id_a.get(i))} vs {_said(by_id_b.get(i))}" for i in differ[:3])
        return f"{len(differ)} of {len(ids)} ids map to other tokens ({shown})"
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "mask_token_id", "sep_token_id"):
        if getattr(a, name, None) != getattr(b, name, None):
            return f"their {name} differ ({getattr(a, name, None)} vs {getattr(b, name, None)})"
    if sorted(a.all_special_tokens) != sorted(b.all_special_tokens):
        return f"their special tokens differ ({sorted(a.all_special_tokens)} vs {sorted(b.all_special_tokens)})"
    return None


def compare_tokenizers(folders: list[Path], names: list[str], allow: bool = False) -> str | None:
    """Refuse nets whose tokenizers differ (`tokenizer_difference`), naming the first pair and ids, unless `allow`;
    returns what differs (for the card) when allowed, else None. Nets without a tokenizer are not compared."""
    reference = _files(folders[0])
    first = None
    for folder, name in zip(folders[1:], names[1:]):
        theirs = _files(folder)
        if not reference or not theirs or theirs == reference:
            continue
        a, b = first or load_tokenizer(folders[0]), load_tokenizer(folder)
        first = a
        if a is None or b is None:
            continue
        difference = tokenizer_difference(a, b)
        if difference is None:
            continue
        said = f"the tokenizers of {names[0]} and {name} differ: {difference}"
        if not allow:
            raise ValueError(
                f"{said}; merging models that read the same ids as other tokens averages unrelated embeddings: "
                f"merge models with one tokenizer, or pass {ALLOW} if you mean it"
            )
        return said
    return None
