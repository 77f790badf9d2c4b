"""Barriers against width for the vision sweeps (REPRODUCING.md, "Beyond the paper: vision"): per matcher, the
permuted midpoint's accuracy and loss barriers, and the barrier left after REPAIR / a BatchNorm reset, mean and
Student-t 95% interval over seeds, from the committed results.csv.

    python benchmarks/vision_figures.py benchmarks/results/vision-width docs/figures/vision_width_barriers.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.reproducing_tables import load  # noqa: E402
from hf_permerge.evaluation.statistics import t_interval  # noqa: E402

X = "model.width_multiplier"


def series(rows: list[dict], metric: str):
    """(widths, means, half-widths) of `metric` per width, over the seeds that hold it."""
    widths = sorted({r[X] for r in rows})
    means, halves, kept = [], [], []
    for w in widths:
        values = [r[metric] for r in rows if r[X] == w and isinstance(r.get(metric), (int, float))]
        if values:
            mean, half = t_interval(values)
            kept.append(w)
            means.append(mean)
            halves.append(half or 0.0)
    return kept, means, halves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    rows = [r for r in load(args.results) if r.get("status") == "done"]
    matchers = sorted({k.split(":")[0] for k in rows[0] if ":barrier_perm_acc" in k})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "acc", "accuracy barrier"), (axes[1], "loss", "loss barrier")):
        for m in matchers:
            for key, style, what in (
                (f"{m}:barrier_perm_{metric}", "-o", "permuted"),
                (f"{m}:repair_barrier_perm_{metric}", "--s", "+ REPAIR"),
                (f"{m}:reset_bn_barrier_perm_{metric}", ":^", "+ BN reset"),
            ):
                if key in rows[0]:
                    xs, ys, hs = series(rows, key)
                    ax.errorbar(xs, ys, yerr=hs, fmt=style, capsize=3, label=f"{m}, {what}")
        xs, ys, hs = series(rows, f"{matchers[0]}:barrier_vanilla_{metric}")
        ax.errorbar(xs, ys, yerr=hs, fmt="-x", color="grey", capsize=3, label="vanilla")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width multiplier")
        ax.set_ylabel(f"test {label}")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{args.results.name}: barriers vs width (mean, t 95% over seeds)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
