"""Merging pairs of small LMs beyond permutations: the held-out loss barrier after the symmetry matcher's classes
(permutation; + per-head maps: queries by A with keys by A^-T, values by B with the output projection's inputs by
B^-1, per head; + an orthogonal residual stream where the model's norms admit it), trained and at init.

For each pair of nets of a trained LM folder (nets 0-1, 2-3, ...), rows like `text_merging.py`'s, one per class,
each with its curve, barrier and midpoint, for `width_law.py` and `reproducing_tables.py`. A class the architecture
does not admit is skipped with the matcher's one-line reason (GPT-2 ties its final LayerNorm's reader, the LM head,
to the embeddings: no orthogonal stream there).

    OMP_NUM_THREADS=1 python benchmarks/beyond_merging.py /work/width-runs/gpt2_h64 --checkpoint step-256 \
        --out benchmarks/results/width-law/step-256/gpt2_h64.beyond.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import load_from_disk

from hf_permerge import PermMerger
from hf_permerge.alignment.matchers import get_matcher
from hf_permerge.alignment.tracing import attach_permutation_spec
from hf_permerge.alignment.transforms import merge_all
from hf_permerge.data.tokens import token_split
from hf_permerge.evaluation.barrier import loss_barrier
from hf_permerge.evaluation.text import token_loss

CLASSES = {
    "symmetry: permutation": dict(symmetry="permutation", head_maps="none"),
    "symmetry: signed permutation": dict(symmetry="signed", head_maps="none"),
    "symmetry: orthogonal stream": dict(symmetry="orthogonal", head_maps="none"),
    "symmetry: permutation + per-head maps": dict(symmetry="permutation", head_maps="all"),
    "symmetry: permutation + orthogonal per-head maps": dict(
        symmetry="permutation", head_maps="all", head_fit="procrustes"
    ),
    "symmetry: orthogonal stream + value maps": dict(symmetry="orthogonal", head_maps="values", head_fit="procrustes"),
}


def curve(models, transforms, lambdas, split, batch_size) -> list[float]:
    return [token_loss(merge_all(models, [transforms], [1 - lam, lam]).eval(), split, batch_size) for lam in lambdas]


def measure_pair(folder: Path, a: int, b: int, evaluation, lambdas, batch_size: int, trained: str) -> list[dict]:
    merger = PermMerger.from_pretrained([str(folder / f"net_{a}"), str(folder / f"net_{b}")])
    spec = merger.spec
    nets = {c: [attach_permutation_spec(merger.load(i, c).eval(), spec) for i in (0, 1)] for c in (trained, "init")}
    rows = []
    for name, settings in CLASSES.items():
        matcher = get_matcher("symmetry", source="weight", **settings)
        started = time.perf_counter()
        try:
            found = matcher.match(*nets[trained])
        except ValueError as err:  # a class the architecture does not admit: its reason, no row
            print(f"pair {a}-{b} {name}: refused: {err}", flush=True)
            continue
        row = {"pair": f"{a}-{b}", "seed": a // 2, "variant": name, "checkpoint": trained}
        row["matching_s"] = time.perf_counter() - started
        for checkpoint, prefix in ((trained, ""), ("init", "init_")):
            losses = curve(nets[checkpoint], found, lambdas, evaluation, batch_size)
            row[prefix + "endpoint_loss"] = (losses[0] + losses[-1]) / 2
            row[prefix + "midpoint_loss"] = losses[len(lambdas) // 2]
            row[prefix + "barrier"] = loss_barrier(lambdas, losses).barrier
            row[prefix + "curve"] = losses
        rows.append(row)
        print(
            f"pair {a}-{b} {name}: barrier {row['barrier']:.3f}, init midpoint {row['init_midpoint_loss']:.3f}",
            flush=True,
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pair_folder", type=Path)
    parser.add_argument("--blocks", type=Path, help="the text cache's blocks folder (default: text_merging's)")
    parser.add_argument("--eval-blocks", type=int, default=128)
    parser.add_argument("--lambdas", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--checkpoint", default="final")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from text_merging import blocks_folder  # noqa: PLC0415  (the same blocks and held-out draw)

    torch.manual_seed(0)
    blocks = load_from_disk(str(args.blocks or blocks_folder()))
    evaluation = token_split(blocks["test"]).subset(args.eval_blocks, seed=0)
    lambdas = [i / (args.lambdas - 1) for i in range(args.lambdas)]
    nets = sorted(int(p.name.split("_")[1]) for p in args.pair_folder.glob("net_*"))
    rows = []
    for a in range(0, len(nets) - 1, 2):
        rows += measure_pair(args.pair_folder, a, a + 1, evaluation, lambdas, args.batch_size, args.checkpoint)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
