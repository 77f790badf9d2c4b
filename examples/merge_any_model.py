"""Align and merge models that have no hand-written permutation spec: transformers' ResNet and ViT.

    python examples/merge_any_model.py --arch resnet --output-dir runs/any_resnet
    python examples/merge_any_model.py --arch vit --output-dir runs/any_vit

Trains two nets of a small `transformers` architecture from scratch on Fashion-MNIST (same recipe,
different seeds for init and data order), saves them as ordinary HF folders, then lets
`PermMerger.from_pretrained([a, b])` trace their permutation spec (residual streams tied, BatchNorm
following its channels; in the ViT, MLP hidden units and attention too: per layer the query and key units
share one permutation and the value units with the output projection's inputs another, each keeping every
head's units together, and by default whole heads move alike in both), align them by activation matching
and merge them at alpha = 0.5: plain, with REPAIR, and (ResNet) with a BatchNorm reset. Writes
`results-<merged folder>.json` and prints the midpoint table; the numbers in REPRODUCING.md ("Beyond the
paper") come from this script. `--matcher weight` and `--keep-heads` (heads stay in place; units are
permuted within each head only) re-use the trained nets of `--output-dir` and write their own merged folder.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import hf_permerge  # noqa: F401  (registers our classes; not needed by the transformers models themselves)
from hf_permerge.data import load_tensors
from hf_permerge.evaluation.interpolation import evaluate_model
from hf_permerge.io_utils import write_json_atomic


def build(arch: str, seed: int, width: int):
    """A fresh transformers model for 28x28 grey images, initialised from `seed`."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    if arch == "resnet":  # conv-BN-ReLU stem, two stages of residual basic blocks with BatchNorm, global pool
        config = ResNetConfig(
            num_channels=1,
            embedding_size=width,
            hidden_sizes=[width, 2 * width],
            depths=[2, 2],
            layer_type="basic",
            downsample_in_first_stage=False,
            num_labels=10,
        )
        return ResNetForImageClassification(config)
    config = ViTConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=width,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=4 * width,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def train(model, data, seed: int, epochs: int, batch_size: int, lr: float, progress: bool):
    """AdamW on index slices of the whole training set; the data order is seeded per net."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    steps = len(data) // batch_size
    bar = tqdm(total=epochs * steps, desc=f"train seed {seed}", disable=not progress, mininterval=1.0)
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1000 * seed + epoch))
        for step in range(steps):
            idx = order[step * batch_size : (step + 1) * batch_size]
            logits = model(pixel_values=data.pixel_values[idx]).logits
            loss = F.cross_entropy(logits, data.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
    bar.close()
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["resnet", "vit"], required=True)
    p.add_argument("--output-dir", required=True, help="holds net_0/, net_1/, merged*/ and results-*.json")
    p.add_argument("--width", type=int, default=None, help="ResNet: first stage channels (16); ViT: hidden size (64)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs=2, default=[1, 2])
    p.add_argument("--matcher", default="activation", choices=["activation", "weight"])
    p.add_argument(
        "--keep-heads", action="store_true", help="keep attention heads in place (permute units within each head only)"
    )
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    width = args.width or (16 if args.arch == "resnet" else 64)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out = Path(args.output_dir)
    train_data, test = load_tensors("fashion_mnist", "train"), load_tensors("fashion_mnist", "test")

    folders, timings = [], {}
    start = time.perf_counter()
    for i, seed in enumerate(args.seeds):
        folder = out / f"net_{i}"
        if not (folder / "model.safetensors").is_file():
            model = train(
                build(args.arch, seed, width), train_data, seed, args.epochs, args.batch_size, args.lr, not args.quiet
            )
            model.save_pretrained(folder)
        folders.append(folder)
    timings["train_s"] = time.perf_counter() - start

    from hf_permerge import PermMerger

    start = time.perf_counter()
    merger = PermMerger.from_pretrained(folders)  # no permutation_spec(): traced from the graph
    timings["trace_s"] = time.perf_counter() - start
    if args.keep_heads:  # the same groups, without the couplings that move whole heads
        from hf_permerge.alignment import PermutationSpec, attach_permutation_spec

        merger.spec = PermutationSpec(merger.spec.groups)
        for i in range(2):
            attach_permutation_spec(merger.load(i), merger.spec)
    start = time.perf_counter()
    merger.align(matcher=args.matcher)  # activation matching: 10,000 training images
    timings["align_s"] = time.perf_counter() - start

    ends = [evaluate_model(merger.load(i), test) for i in range(2)]
    mean_end = {k: (ends[0][k] + ends[1][k]) / 2 for k in ("acc", "loss")}
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in merger.load(0).modules())
    rows = {}
    for permute in (False, True):
        for repair in (None, "repair", *(["reset_bn"] if has_bn else [])):
            r = evaluate_model(merger.merge(0.5, permute=permute, repair=repair), test)
            rows[f"{'permuted' if permute else 'vanilla'}+{repair or 'none'}"] = {
                "acc": r["acc"],
                "loss": r["loss"],
                "barrier_midpoint_acc": mean_end["acc"] - r["acc"],
                "barrier_midpoint_loss": r["loss"] - mean_end["loss"],
            }
    best = max((k for k in rows if k.startswith("permuted")), key=lambda k: rows[k]["acc"])
    merged = merger.merge(0.5, repair=None if best.endswith("none") else best.split("+")[1])
    merged_dir = out / (
        "merged"
        if args.matcher == "activation" and not args.keep_heads
        else f"merged-{args.matcher}{'-keep-heads' if args.keep_heads else ''}"
    )
    merger.save_pretrained(
        merged_dir, model=merged, command=f"python examples/merge_any_model.py --arch {args.arch}", overwrite=True
    )  # a rerun replaces its own merged folder
    results = {
        "arch": args.arch,
        "width": width,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "matcher": args.matcher,
        "keep_heads": args.keep_heads,
        "couplings": [list(c) for c in merger.spec.couplings],
        "groups": {g.name: g.size for g in merger.spec.groups},
        "skipped": merger.traced.skipped,
        "repair_modules": list(merger.traced.repair_modules),
        "endpoints": [{"acc": e["acc"], "loss": e["loss"]} for e in ends],
        "midpoints": rows,
        "timings": timings,
        "merged_saved_with": best,
    }
    write_json_atomic(out / f"results-{merged_dir.name}.json", results)
    print(
        f"{args.arch}: {len(merger.spec.groups)} permutation groups traced, {len(merger.traced.skipped)} left "
        f"unpermuted; endpoints test acc {ends[0]['acc']:.4f} / {ends[1]['acc']:.4f}"
    )
    print(f"{'midpoint (alpha 0.5)':24s} {'test acc':>9s} {'barrier':>8s}")
    for name, r in rows.items():
        print(f"{name:24s} {r['acc']:9.4f} {r['barrier_midpoint_acc']:+8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
