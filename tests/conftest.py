"""Shared fixtures: small real Fashion-MNIST folders in IDX format, tiny run configs."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def pytest_assertrepr_compare(op, left, right):
    """`assert a == b` on two `Permutations` prints which groups and slots differ."""
    from hf_permerge.alignment import Permutations

    if op == "==" and isinstance(left, Permutations) and isinstance(right, Permutations):
        return [f"{left!r} == {right!r}", *left.difference(right)]
    return None


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file (uint8 payload), gzipped: the format the Debian package ships."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture(scope="session")
def real_fmnist() -> Path:
    if not (REAL_FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail("real Fashion-MNIST missing: run `make test` (it installs dataset-fashion-mnist)")
    return REAL_FMNIST


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory, real_fmnist) -> Path:
    """The first 1000 train / 500 test images of the real data, as IDX files in a folder of their own."""
    from hf_permerge.data.idx import read_idx

    out = tmp_path_factory.mktemp("tiny_fmnist")
    for prefix, n in (("train", 1000), ("t10k", 500)):
        write_idx(out / f"{prefix}-images-idx3-ubyte.gz", read_idx(real_fmnist / f"{prefix}-images-idx3-ubyte.gz")[:n])
        write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", read_idx(real_fmnist / f"{prefix}-labels-idx1-ubyte.gz")[:n])
    return out


@pytest.fixture
def tiny_config(tiny_fmnist):
    """A 2-net, 1x32 MLP run on the tiny data: 10 steps per epoch."""
    from hf_permerge.config import config_from_dict

    def make(**sections):
        data = {
            "model": {"type": "mlp", "depth": 1, "width": 32},
            "data": {"dataset": "fashion_mnist", "data_dir": str(tiny_fmnist)},
            "training": {"num_nets": 2, "seed": 0, "epochs": 2, "batch_size": 100, "save_steps": [5]},
        }
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        return config_from_dict(data)

    return make


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, tiny_fmnist):
    """Three trained 1x32 MLPs (2 epochs on 1000 real images), with init/step-5/final checkpoints."""
    from hf_permerge.config import config_from_dict
    from hf_permerge.training import PairTrainer

    cfg = config_from_dict(
        {
            "model": {"type": "mlp", "depth": 1, "width": 32},
            "data": {"dataset": "fashion_mnist", "data_dir": str(tiny_fmnist)},
            "training": {"num_nets": 3, "seed": 0, "epochs": 2, "save_steps": [5]},
            "alignment": {"num_examples": 1000},
            "evaluation": {"train_subset": 1000},
        }
    )
    out = tmp_path_factory.mktemp("pairs") / "tiny_pair"
    PairTrainer(cfg, out, progress=False).train()
    return out


@pytest.fixture
def run_cli(monkeypatch):
    """`hf-permerge ARGS` in this process; `main` may install a SIGTERM handler, which is put back."""
    import signal

    from hf_permerge import cli

    handler = signal.getsignal(signal.SIGTERM)

    def run(*args):
        monkeypatch.setattr("sys.argv", ["hf-permerge", *map(str, args)])
        try:
            return cli.main([*map(str, args)])
        finally:
            signal.signal(signal.SIGTERM, handler)

    return run


FAKE_BOOKS = ("Ge", "Exo", "Lev", "Num", "Deu", "Josh", "Jdgs", "Ruth", "1Sm", "2Sm", "1Ki", "2Ki")


def fake_bible_text(books=FAKE_BOOKS, chapters: int = 1, verses: int = 6) -> str:
    """Text in the format of `bible -f`, one verse a line, from a small vocabulary (seeded): learnable, and tiny."""
    import random

    rng = random.Random(0)
    words = "and the of he said unto lord god was is that in his them for they be shall land house king".split()
    return "".join(
        f"{book}{c}:{v} " + " ".join(rng.choice(words) for _ in range(10)) + ".\n"
        for book in books
        for c in range(1, chapters + 1)
        for v in range(1, verses + 1)
    )


@pytest.fixture
def fake_bible(monkeypatch, tmp_path):
    """The King James reader returns `fake_bible_text()` (no corpus in tests); the tokenized text is cached in
    tmp_path. Returns a setter for another text."""
    from hf_permerge.data import kjv, text

    state = {"text": fake_bible_text()}
    monkeypatch.setattr(kjv, "run_bible", lambda: state["text"])
    monkeypatch.setenv("HF_PERMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(text, "_MEMORY", {})

    def use(new_text: str) -> None:
        state["text"] = new_text

    return use


@pytest.fixture
def tiny_lm_config(fake_bible):
    """A 2-net run of tiny LLaMA-style LMs (GQA) on the fake text: 6 training steps per epoch."""
    from hf_permerge.config import config_from_dict

    def make(**sections):
        data = {
            "model": {
                "type": "transformers",
                "model_type": "llama",
                "config": {
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "tie_word_embeddings": False,
                },
            },
            "data": {"dataset": "kjv", "vocab_size": 300, "block_size": 16, "heldout_every": 4},
            "training": {"num_nets": 2, "seed": 0, "epochs": 2, "batch_size": 8, "lr": 3e-3, "save_steps": [3]},
        }
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        return config_from_dict(data)

    return make
