"""App. F.2 at k = 32: the two CNN families side by side, per learning rate, as mean ± Student-t 95% half-width
over seeds (the first family's cells are Fig. 4's). Prints a markdown table and draws the figure.

    python benchmarks/results/appF-family2-k32/families.py docs/figures/appF_k32.png
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from hf_permerge.evaluation.statistics import t_interval

HERE = Path(__file__).parent
FAMILIES = {
    "32-32-avg-64-64": (HERE.parent / "fig4-k32" / "results.json", "training.lr"),
    "32-avg-64-avg-128": (HERE / "results.json", "case"),
}
METRICS = {
    "single_acc": "single net acc",
    "perm_acc": "perm avg acc",
    "random_acc": "random-perm avg acc",
    "barrier_perm_acc": "barrier perm acc",
    "barrier_perm_loss": "barrier perm loss",
    "init_perm_acc": "init: perm avg acc",
}


def rate(value) -> float:
    return float(str(value).split()[-1])


rows = {}
for family, (path, key) in FAMILIES.items():
    for cell in json.load(open(path))["cells"]:
        if cell.get("status") == "done":
            rows.setdefault((family, rate(cell[key])), []).append(cell)

print("| family | lr | n | " + " | ".join(METRICS.values()) + " |")
print("|---|---|---|" + "---|" * len(METRICS))
stats = {}
for (family, lr), cells in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    stats[family, lr] = {m: t_interval([c[m] for c in cells]) for m in METRICS}
    cols = " | ".join(f"{mean:.3f} ± {half:.3f}" for mean, half in stats[family, lr].values())
    print(f"| {family} | {lr} | {len(cells)} | {cols} |")

if len(sys.argv) > 1:
    shown = ["perm_acc", "barrier_perm_loss", "init_perm_acc"]
    fig, axes = plt.subplots(1, len(shown), figsize=(10, 3.2))
    rates = sorted({lr for _, lr in stats})
    for ax, metric in zip(axes, shown):
        for i, family in enumerate(FAMILIES):
            xs = [j + (i - 0.5) * 0.25 for j in range(len(rates))]
            means = [stats[family, lr][metric][0] for lr in rates]
            halves = [stats[family, lr][metric][1] for lr in rates]
            ax.errorbar(xs, means, yerr=halves, fmt="o", capsize=4, label=family)
        if metric == "init_perm_acc":
            ax.axhline(0.1, color="grey", ls=":", lw=1, label="chance")
        ax.set_xticks(range(len(rates)), [f"lr {lr}" for lr in rates])
        ax.set_xlim(-0.6, len(rates) - 0.4)
        ax.set_title(METRICS[metric], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ns = sorted({len(cells) for cells in rows.values()})
    fig.suptitle(f"App. F.2 at k = 32, 5 epochs SGD: mean ± t95 over n = {'/'.join(map(str, ns))} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(sys.argv[1], dpi=100)
