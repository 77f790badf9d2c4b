"""Merging pairs of small language models: held-out loss along lambda, vanilla against aligned, trained and at init.

For each pair of nets of a trained LM folder (`hf-permerge train configs/kjv_llama_tiny.yaml ...`; nets 0-1, 2-3,
... are the pairs, each net its own seed): the vanilla average, weight matching, activation matching (on training
blocks), ablations of activation matching that keep a kind of group in place (the residual stream; the attention
heads, where the spec moves them), and a seeded random permutation. Every variant is measured on the trained nets
and on their untrained inits under the permutation found after training (the paper's question), as held-out loss
per token at each lambda, against ln V (a uniform guess). One row per pair and variant, for
`benchmarks/reproducing_tables.py`; the curves ride along in each row; `--plot` draws them.

    OMP_NUM_THREADS=1 python benchmarks/text_merging.py /work/lmruns/kjv_llama6 \
        --out benchmarks/results/text-merging/kjv_llama.json --plot docs/figures/text_merging_kjv_llama.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from datasets import load_from_disk

from hf_permerge import PermMerger
from hf_permerge.alignment.permutations import Permutations
from hf_permerge.data.text import cache_root as text_cache
from hf_permerge.data.tokens import token_split
from hf_permerge.evaluation.barrier import loss_barrier
from hf_permerge.evaluation.text import token_loss
from hf_permerge.merging.averaging import average_state_dicts


def blocks_folder() -> Path:
    """The held-out and training blocks the pair was trained on: the one set of King James blocks in the text
    cache ($HF_PERMERGE_CACHE, as the trainer used it)."""
    found = sorted((text_cache() / "text").glob("kjv-*/blocks"))
    if len(found) != 1:
        raise SystemExit(f"{len(found)} sets of King James blocks under {text_cache()}: pass --blocks DIR")
    return found[0]


def curve(probe, start: dict, end: dict, lambdas, split, batch_size: int) -> list[float]:
    losses = []
    for lam in lambdas:
        probe.load_state_dict(average_state_dicts([start, end], [1 - lam, lam]))
        losses.append(token_loss(probe, split, batch_size))
    return losses


def keep_in_place(perms: Permutations, spec, kind: str) -> Permutations:
    """The same permutations with one kind of group left in place: 'stream' (the residual stream: the group
    that permutes the token embedding) or 'heads' (every group of an attention coupling)."""
    if kind == "stream":
        names = {spec.groups[0].name}
    else:
        names = {n for c in spec.couplings for n in c}
    return Permutations(
        {g: (torch.arange(len(p)) if g in names else p) for g, p in perms.items()}, {**perms.info, "kept": kind}
    )


def measure_pair(
    folder: Path, a: int, b: int, evaluation, matching, lambdas, batch_size: int, seed: int, trained: str = "final"
):
    merger = PermMerger.from_pretrained([str(folder / f"net_{a}"), str(folder / f"net_{b}")])
    spec = merger.spec
    model = merger.load(0)
    probe = type(model)(model.config).eval()
    variants: dict[str, Permutations] = {}
    started = time.perf_counter()
    variants["weight"] = merger.align(matcher="weight", checkpoint=trained)[1]
    weight_s = time.perf_counter() - started
    started = time.perf_counter()
    activation = merger.align(matching, matcher="activation", checkpoint=trained)[1]
    activation_s = time.perf_counter() - started
    variants["activation"] = activation
    variants["activation, residual stream kept"] = keep_in_place(activation, spec, "stream")
    if spec.couplings:
        variants["activation, heads kept"] = keep_in_place(activation, spec, "heads")
    variants["random permutation"] = Permutations.random(spec, seed=seed)
    identity = Permutations.identity(spec)
    rows = []
    ends = {}
    for checkpoint in (trained, "init"):
        ends[checkpoint] = [token_loss(merger.load(i, checkpoint), evaluation, batch_size) for i in (0, 1)]
    for name in ["vanilla", *variants]:
        row = {"pair": f"{a}-{b}", "seed": a // 2, "variant": name, "checkpoint": trained}
        for checkpoint, prefix in ((trained, ""), ("init", "init_")):
            merger.set_permutations([identity, variants.get(name, identity)])
            start = merger.permuted_state(0, checkpoint)
            end = merger.permuted_state(1, checkpoint, permute=name != "vanilla")
            losses = curve(probe, start, end, lambdas, evaluation, batch_size)
            row[prefix + "endpoint_loss"] = sum(ends[checkpoint]) / 2
            row[prefix + "midpoint_loss"] = losses[len(lambdas) // 2]
            row[prefix + "barrier"] = loss_barrier(lambdas, losses).barrier
            row[prefix + "curve"] = losses
        rows.append(row)
        print(
            f"pair {a}-{b} {name}: midpoint {row['midpoint_loss']:.3f}, barrier {row['barrier']:.3f}; "
            f"init midpoint {row['init_midpoint_loss']:.3f}",
            flush=True,
        )
    vanilla = rows[0]
    for row in rows:
        row["barrier_removed"] = 1 - row["barrier"] / vanilla["barrier"] if vanilla["barrier"] > 0 else None
        row["init_midpoint_gain"] = vanilla["init_midpoint_loss"] - row["init_midpoint_loss"]
        row["log_vocab"] = math.log(model.config.vocab_size)
        row["weight_matching_s"], row["activation_matching_s"] = weight_s, activation_s
        row["groups"] = len(spec.groups)
        row["couplings"] = len(spec.couplings)
        row["kept_in_place"] = sorted((merger.traced.kept if merger.traced else {}) or {})
    return rows


def plot(rows: list[dict], lambdas, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_permerge.evaluation.statistics import t_interval

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    for ax, prefix, title in (
        (axes[0], "", "trained"),
        (axes[1], "init_", "untrained inits, permutation from training"),
    ):
        for name in names:
            curves = torch.tensor([r[prefix + "curve"] for r in rows if r["variant"] == name])
            mean = curves.mean(0)
            half = torch.tensor([t_interval(curves[:, j].tolist())[1] for j in range(curves.shape[1])])
            line = ax.plot(lambdas, mean, marker="o", ms=3, label=f"{name} (n={len(curves)})")[0]
            ax.fill_between(lambdas, mean - half, mean + half, color=line.get_color(), alpha=0.15)
        if prefix:
            ax.axhline(rows[0]["log_vocab"], color="grey", ls="--", lw=1, label="ln V (uniform guess)")
        ax.set_title(title)
        ax.set_xlabel("λ (0: net A, 1: net B)")
        ax.set_ylabel("held-out loss per token (nats)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pair_folder", type=Path, help="a trained LM folder with net_0 .. net_{2k-1}")
    parser.add_argument("--blocks", type=Path, help="the text cache's blocks folder (default: from the run config)")
    parser.add_argument("--eval-blocks", type=int, default=256, help="held-out blocks the losses are measured on")
    parser.add_argument("--match-blocks", type=int, default=512, help="training blocks activation matching reads")
    parser.add_argument("--lambdas", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    parser.add_argument(
        "--checkpoint", default="final", help="the trained checkpoint to align and merge (final, or step-N saved)"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    blocks = load_from_disk(str(args.blocks or blocks_folder()))
    evaluation = token_split(blocks["test"]).subset(args.eval_blocks, seed=0)
    matching = blocks["train"].shuffle(seed=0).select(range(args.match_blocks))
    nets = sorted(int(p.name.split("_")[1]) for p in args.pair_folder.glob("net_*"))
    lambdas = [i / (args.lambdas - 1) for i in range(args.lambdas)]
    rows = []
    for a in range(0, len(nets) - 1, 2):
        rows += measure_pair(
            args.pair_folder, a, a + 1, evaluation, matching, lambdas, args.batch_size, seed=a, trained=args.checkpoint
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    meta = {
        "eval_blocks": len(evaluation),
        "eval_tokens": evaluation.num_tokens,
        "match_blocks": args.match_blocks,
        "lambdas": lambdas,
    }
    args.out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=1))
    if args.plot:
        plot(rows, lambdas, args.plot)


if __name__ == "__main__":
    main()
