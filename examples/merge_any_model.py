"""Merge models that have no hand-written permutation spec: transformers' ResNet and ViT, trained by the PairTrainer.

    python examples/merge_any_model.py --arch resnet --output-dir runs/any_resnet
    python examples/merge_any_model.py --arch vit --output-dir runs/any_vit --set training.epochs=1

Trains a seeded pair of a small `transformers` image classifier on Fashion-MNIST with the shipped run config
(`configs/fmnist_resnet_tiny.yaml` or `configs/fmnist_vit_tiny.yaml`, changed with `--set`, as `hf-permerge train`
does), then lets `PermMerger.from_pretrained([net_0, net_1])` trace their permutation spec (residual streams tied,
BatchNorm following its channels; in the ViT, MLP hidden units and attention too: per layer the query and key units
share one permutation and the value units with the output projection's inputs another, each keeping every head's
units together, and by default whole heads move alike in both), align them and merge them at alpha = 0.5: plain,
with REPAIR, and (ResNet) with a BatchNorm reset. Writes `results-<merged folder>.json` and prints the midpoint
table. `--matcher weight` and `--keep-heads` (heads stay in place; units are permuted within each head only) re-use
the trained pair of `--output-dir` and write their own merged folder. `hf-permerge run CONFIG` gives the report
(curves, barriers, plots) of such a pair; this script adds the midpoint table of every correction and `--keep-heads`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hf_permerge.config import load_config
from hf_permerge.data import load_tensors
from hf_permerge.evaluation.interpolation import evaluate_model
from hf_permerge.io_utils import write_json_atomic
from hf_permerge.training import PairTrainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["resnet", "vit"], required=True)
    p.add_argument("--output-dir", required=True, help="holds pair/ (the trained nets), merged*/ and results-*.json")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override the run config, e.g. --set model.width_multiplier=2 --set training.epochs=1",
    )
    p.add_argument("--matcher", default="activation", choices=["activation", "weight"])
    p.add_argument(
        "--keep-heads", action="store_true", help="keep attention heads in place (permute units within each head only)"
    )
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out = Path(args.output_dir)
    config = load_config(CONFIGS / f"fmnist_{args.arch}_tiny.yaml", args.overrides)
    test = load_tensors("fashion_mnist", "test", data_dir=config.data.data_dir, mean_std=config.data.mean_std())

    timings = {}
    start = time.perf_counter()
    pair = out / "pair"
    if not (pair / "pair.json").is_file():  # a rerun (another --matcher) re-uses the pair
        PairTrainer(config, pair, overwrite=pair.exists(), progress=not args.quiet).train()
    folders = [pair / "net_0" / "final", pair / "net_1" / "final"]
    timings["train_s"] = time.perf_counter() - start

    from hf_permerge import PermMerger

    start = time.perf_counter()
    merger = PermMerger.from_pretrained(folders)  # no permutation_spec(): traced from the graph
    merger.use_data(config.data.dataset, config.data.data_dir)
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
        "config": config.to_dict(),
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
