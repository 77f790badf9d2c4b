"""What a pair folder records about its run (pair.json): config, seeds, data fingerprints, steps, versions and
the nets' test metrics; and the step arithmetic that the trainer and the config checks share."""

from __future__ import annotations

import torch

from ..config import RunConfig
from .seeds import derive_seed


def _versions() -> dict:
    import accelerate
    import transformers

    from .. import __version__

    return {
        "hf_permerge": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


def total_steps(tc, num_train: int) -> int:
    """Optimiser steps of a run: whole batches only (the last partial batch of an epoch is dropped)."""
    total = (num_train // tc.batch_size) * tc.epochs
    return min(total, tc.max_steps) if tc.max_steps else total


def check_steps(tc, num_train: int, examples: str = "images") -> None:
    """Refuse, before any output, a run that would take no step or save a checkpoint it never reaches."""
    if num_train // tc.batch_size == 0:
        raise ValueError(
            f"training.batch_size {tc.batch_size} is larger than the {num_train} training {examples}: no "
            f"step would run; set training.batch_size to {num_train} or less"
        )
    total = total_steps(tc, num_train)
    late = [s for s in tc.save_steps if s > total]
    if late:
        raise ValueError(
            f"training.save_steps {late} lie beyond the run's last step ({total}: "
            f"{num_train // tc.batch_size} steps per epoch); drop them or train longer"
        )


def _text_record(train, test) -> dict:
    """What a text run's examples are: blocks of tokens, made of which books."""
    return {
        "examples": "blocks",
        "block_size": int(train.input_ids.shape[1]),
        "num_train_tokens": int(train.input_ids.numel()),
        "num_test_tokens": int(test.input_ids.numel()),
        "tokenizer_vocab_size": len(train.tokenizer),
        "train_books": list(train.documents),
        "test_books": list(test.documents),
    }


def pair_record(cfg: RunConfig, train, test, metrics: list[dict], train_s: float, trained_together: int = 1) -> dict:
    """The pair.json of a finished run of `cfg` on the `train` / `test` splits."""
    steps_per_epoch = len(train) // cfg.training.batch_size
    total = total_steps(cfg.training, len(train))
    return {
        "format": "hf_permerge.pair/1",
        "num_nets": cfg.training.num_nets,
        "config": cfg.to_dict(),
        "seeds": [
            {stream: derive_seed(cfg.training.seed, i, stream) for stream in ("init", "data", "random")}
            for i in range(cfg.training.num_nets)
        ],
        "data": {
            "dataset": cfg.data.dataset,
            "train_fingerprint": train.fingerprint,
            "test_fingerprint": test.fingerprint,
            "num_train": len(train),
            "num_test": len(test),
            **(_text_record(train, test) if cfg.data.is_text else {}),
        },
        "steps": {
            "per_epoch": steps_per_epoch,
            "total": total,
            "saved": sorted(s for s in cfg.training.save_steps if s <= total),
        },
        "checkpoints": ["init"] + [f"step-{s}" for s in sorted(cfg.training.save_steps) if s <= total] + ["final"],
        "versions": _versions(),
        "timings": {"train_s": train_s, **({"trained_together": trained_together} if trained_together > 1 else {})},
        "nets": metrics,
    }
