"""Text data: the King James reader, the split by book, the tokenizer (training books only), blocks and their cache.
No corpus here: the reader's output is a small fake in its format (conftest `fake_bible`)."""

import pytest
import torch
from conftest import FAKE_BOOKS, fake_bible_text

from hf_permerge.data import kjv, text
from hf_permerge.data.tokenizer import EOS_ID


def test_parse_books_keeps_canonical_order_and_drops_references():
    books = kjv.parse_books("Ge1:1 In the beginning.\nGe1:2 And the earth.\n1Sm3:4 That the LORD called Samuel.\n")
    assert [b.name for b in books] == ["Ge", "1Sm"]
    assert books[0].text() == "In the beginning.\nAnd the earth.\n"


def test_a_line_that_is_not_a_verse_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"line 2 .*'garbage'.*apt-get install -y bible-kjv"):
        kjv.parse_books("Ge1:1 In the beginning.\ngarbage\n")


def test_split_is_disjoint_by_book_and_holds_out_every_kth():
    books = kjv.parse_books(fake_bible_text())
    train, heldout = kjv.split_books(books, 4)
    assert [b.name for b in heldout] == [FAKE_BOOKS[i] for i in (3, 7, 11)]  # books 4, 8, 12 (1-based)
    assert {b.name for b in train}.isdisjoint(b.name for b in heldout)
    assert len(train) + len(heldout) == len(books) == len(FAKE_BOOKS)


def test_split_refuses_a_text_with_no_heldout_book():
    with pytest.raises(ValueError, match="no book would be held out"):
        kjv.split_books(kjv.parse_books(fake_bible_text(books=("Ge", "Exo"))), 4)


def test_missing_bible_program_is_a_one_line_error_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `bible` on it
    with pytest.raises(FileNotFoundError) as err:
        kjv.read_kjv()
    message = str(err.value)
    assert "\n" not in message and "`apt-get install -y bible-kjv`" in message


def test_splits_are_blocks_of_disjoint_books(fake_bible):
    train, test = text.load_text_splits("kjv", 300, 16, 4)
    assert train.input_ids.dtype == torch.int64 and train.input_ids.shape[1] == 16
    assert set(train.documents).isdisjoint(test.documents) and test.documents == ("Num", "Ruth", "2Ki")
    assert train.tokenizer is test.tokenizer
    assert (train.input_ids == EOS_ID).any()  # books end with the end-of-text token
    xs, ys = train.batches(torch.tensor([[0, 2], [1, 3]]))
    assert xs.shape == (2, 2, 16) and torch.equal(xs[1, 1], train.input_ids[3]) and ys is xs


def test_tokenizer_sees_the_training_books_only(fake_bible):
    """A word that occurs only in held-out books (here, book 4) is never merged into a token of its own."""
    lines = fake_bible_text().splitlines()
    heldout = [ln if not ln.startswith("Num") else ln + " zebulunite zebulunite zebulunite" for ln in lines]
    fake_bible("\n".join(heldout) + "\n")
    train, _ = text.load_text_splits("kjv", 300, 16, 4)
    assert len(train.tokenizer.tokenize(" zebulunite")) > 3
    assert len(train.tokenizer.tokenize(" lord")) == 1


def test_tokenized_text_is_cached_and_read_back(fake_bible, monkeypatch, tmp_path):
    import datasets
    from transformers import AutoTokenizer

    train, test = text.load_text_splits("kjv", 300, 16, 4)
    monkeypatch.setattr(text, "_MEMORY", {})
    monkeypatch.setattr(text, "train_tokenizer", lambda *a, **k: pytest.fail("not read from the cache"))
    train2, test2 = text.load_text_splits("kjv", 300, 16, 4)
    assert torch.equal(train.input_ids, train2.input_ids) and train.fingerprint == train2.fingerprint
    assert test2.documents == test.documents
    (folder,) = (tmp_path / "cache" / "text").iterdir()
    blocks = datasets.load_from_disk(str(folder / "blocks"))
    assert blocks["test"].column_names == ["input_ids", "attention_mask"] and len(blocks["test"]) == len(test)
    assert AutoTokenizer.from_pretrained(folder / "tokenizer").eos_token_id == EOS_ID


def test_another_block_size_is_another_cache_entry(fake_bible, tmp_path):
    text.load_text_splits("kjv", 300, 16, 4)
    text.load_text_splits("kjv", 300, 8, 4)
    assert len(list((tmp_path / "cache" / "text").iterdir())) == 2


def test_to_dataset_is_the_interchange_format_that_matching_reads(fake_bible):
    """The held-out blocks as a `datasets.Dataset` come back through `token_split` (what `PermMerger.align(dataset)`
    reads) as the same tensors: one TokenSplit for training and matching."""
    from hf_permerge.data import token_split

    _, test = text.load_text_splits("kjv", 300, 16, 4)
    ds = test.to_dataset()
    assert ds.column_names == ["input_ids", "attention_mask"] and len(ds) == len(test)
    back = token_split(ds, vocab_size=300)
    assert torch.equal(back.input_ids, test.input_ids) and back.num_tokens == test.input_ids.numel()
    assert test.subset(5, seed=1).tokenizer is test.tokenizer and test.to("cpu").documents == test.documents
