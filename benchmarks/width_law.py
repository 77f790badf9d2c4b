"""The width law for transformers (the paper's Fig. 2, asked of language models): the loss barrier after alignment
against the model's width, and the permuted-init question at each width, from `benchmarks/text_merging.py`'s rows.

One JSON of rows per width (3 pairs each: `text_merging.py RUN --out W.json`), named after the width's run
(`gpt2_h64.json`: width 64), `beyond_merging.py`'s rows beside it (`gpt2_h64.beyond.json`), and the training
record of each run (`gpt2_h64.training.json`: every net's
stop step and why, from the run's pair.json). Every cell is `mean ± h`, h the half-width of the Student-t 95%
interval over the pairs (n - 1 degrees of freedom).

    python benchmarks/width_law.py benchmarks/results/width-law/gpt2_h*.json --plot docs/figures/width_law_gpt2.png
    python benchmarks/width_law.py --record /work/width-runs/gpt2_h64 benchmarks/results/width-law/gpt2_h64.training.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from hf_permerge.evaluation.statistics import t_interval

VARIANTS = (
    "vanilla",
    "weight",
    "activation",
    "activation, heads kept",
    "random permutation",
    "symmetry: permutation + per-head maps",
    "symmetry: permutation + orthogonal per-head maps",
)
"""The rows shown; `beyond_merging.py`'s (W.beyond.json beside W.json) join them: its permutation row is weight
matching again, its orthogonal stream is refused for GPT-2 (a tied LM head)."""


def width_of(path: Path) -> int:
    found = re.search(r"_h(\d+)", path.stem)
    if found is None:
        raise SystemExit(f"{path}: name it after its run's width (gpt2_h64.json)")
    return int(found.group(1))


def cell(values: list[float], digits: int = 3) -> str:
    mean, half = t_interval(values)
    return f"{mean:.{digits}f}" if half is None else f"{mean:.{digits}f} ± {half:.{digits}f}"


def summarise(paths: list[Path]) -> list[dict]:
    """Per width and variant: n, the barrier, its share of the vanilla barrier removed, the midpoint of the
    permuted inits against the vanilla inits' (positive: the permuted inits average better), each a list over pairs."""
    out = []
    paths = [p for p in paths if not p.name.endswith((".beyond.json", ".training.json", ".meta.json"))]
    for path in sorted(paths, key=width_of):
        rows = json.loads(path.read_text())
        beyond = path.with_name(path.stem + ".beyond.json")
        if beyond.is_file():  # share removed and init gain against the same pair's vanilla row
            vanilla = {r["pair"]: r for r in rows if r["variant"] == "vanilla"}
            for r in json.loads(beyond.read_text()):
                v = vanilla[r["pair"]]
                r["barrier_removed"] = 1 - r["barrier"] / v["barrier"] if v["barrier"] > 0 else None
                r["init_midpoint_gain"] = v["init_midpoint_loss"] - r["init_midpoint_loss"]
                rows.append(r)
        training = path.with_name(path.stem + ".training.json")
        record = json.loads(training.read_text()) if training.is_file() else {}
        for variant in VARIANTS:
            chosen = [r for r in rows if r["variant"] == variant]
            if not chosen:
                continue
            out.append(
                {
                    "width": width_of(path),
                    "checkpoint": chosen[0].get("checkpoint", "final"),
                    "variant": variant,
                    "n": len(chosen),
                    "endpoint_loss": [r["endpoint_loss"] for r in chosen],
                    "barrier": [r["barrier"] for r in chosen],
                    "removed": [r["barrier_removed"] for r in chosen if r["barrier_removed"] is not None],
                    "init_gain": [r["init_midpoint_gain"] for r in chosen],
                    "steps": record.get("stop_steps"),
                    "reasons": record.get("stop_reasons"),
                }
            )
    return out


def table(summary: list[dict]) -> str:
    lines = [
        "| width | variant | n | endpoint loss | barrier (nats) | share of vanilla barrier removed | "
        "init midpoint: vanilla − variant (nats) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        removed = cell(s["removed"], 2) if s["variant"] != "vanilla" and s["removed"] else "—"
        gain = cell(s["init_gain"]) if s["variant"] != "vanilla" else "—"
        lines.append(
            f"| {s['width']} | {s['variant']} | {s['n']} | {cell(s['endpoint_loss'])} | {cell(s['barrier'])} | "
            f"{removed} | {gain} |"
        )
    return "\n".join(lines)


PLOTTED = [v for v in VARIANTS if v != "symmetry: permutation + per-head maps"]
"""The figure leaves out the least-squares per-head maps (barriers of 1-3 nats would flatten every other line);
the table has them."""


def plot(summary: list[dict], out: Path) -> None:
    """Fig. 2's layout: the barrier against width (log scale), one line per variant with its t interval; beside it
    the permuted inits' midpoint gain over the vanilla inits'. One colour per variant in both panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(PLOTTED, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    checkpoint = summary[0]["checkpoint"] if summary else "final"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant in PLOTTED:
        points = [s for s in summary if s["variant"] == variant]
        if not points:
            continue
        widths = [s["width"] for s in points]
        for ax, key in ((axes[0], "barrier"), (axes[1], "init_gain")):
            if key == "init_gain" and variant == "vanilla":
                continue
            stats = [t_interval(s[key]) for s in points]
            ax.errorbar(
                widths,
                [m for m, _ in stats],
                yerr=[h or 0.0 for _, h in stats],
                marker="o",
                ms=4,
                capsize=3,
                color=colours[variant],
                label=f"{variant} (n={points[0]['n']})",
            )
    axes[0].set_title(f"loss barrier (eq. 2) of the trained LMs ({checkpoint})")
    axes[0].set_ylabel("barrier (nats per token)")
    axes[0].set_ylim(bottom=0)
    axes[1].set_title("untrained inits: vanilla midpoint − permuted midpoint")
    axes[1].set_ylabel("nats per token (> 0: permuted inits better)")
    axes[1].axhline(0.0, color="grey", lw=1, ls="--")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width (hidden size; 4 layers, 4 heads)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def record(run: Path, out: Path) -> None:
    """A run's training record for the results: every net's stop step and reason, its best held-out loss."""
    pair = json.loads((run / "pair.json").read_text())
    nets = pair["nets"]
    data = {
        "run": str(run),
        "stop_steps": [n["stop"]["step"] for n in nets],
        "stop_reasons": [n["stop"]["reason"] for n in nets],
        "criterion": nets[0]["stop"]["criterion"],
        "best_heldout": [n["stop"]["best"] for n in nets],
        "config": pair.get("config"),
        "timings": pair.get("timings"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=Path, help="text_merging.py rows, one file per width")
    parser.add_argument("--plot", type=Path, help="write the figure here")
    parser.add_argument("--record", nargs=2, type=Path, metavar=("RUN", "OUT"), help="write RUN's training record")
    args = parser.parse_args(argv)
    if args.record:
        record(*args.record)
        return
    summary = summarise(args.results)
    print(table(summary))
    for width in sorted({s["width"] for s in summary}):
        s = next(s for s in summary if s["width"] == width)
        if s["checkpoint"] != "final":
            print(f"width {width}: checkpoint {s['checkpoint']} of every net")
        elif s["steps"]:
            print(f"width {width}: final checkpoints at steps {s['steps']}, ended by {sorted(set(s['reasons']))}")
    if args.plot:
        plot(summary, args.plot)


if __name__ == "__main__":
    main()
