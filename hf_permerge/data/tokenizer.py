"""A byte-level BPE tokenizer trained with `tokenizers` on a training split, as a `PreTrainedTokenizerFast` (what
`AutoTokenizer.from_pretrained` gives back from its folder).

Byte level: every text is encodable (no unknown token), and the 256 byte symbols are always in the vocabulary.
The one special token comes first, so its id (0) is the same for every corpus and vocabulary size: a model's config
can be written before the tokenizer is trained.
"""

from __future__ import annotations

from collections.abc import Iterable

EOS = "<|endoftext|>"
"""End of a document; also the beginning-of-text and padding token (GPT-2's convention)."""
SPECIAL_TOKENS = (EOS,)
EOS_ID = 0
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""The byte alphabet and the special tokens: a vocabulary this small has no merges."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int | None = None):
    """A byte-level BPE tokenizer with at most `vocab_size` tokens, trained on `texts` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is below the {MIN_VOCAB_SIZE} byte-level symbols; set it higher")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    assert tokenizer.token_to_id(EOS) == EOS_ID
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        **({"model_max_length": model_max_length} if model_max_length else {}),
    )
