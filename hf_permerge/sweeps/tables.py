"""The sweep's results table: one row per cell, and per group the mean over seeds with its Student-t 95% interval."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from statistics import fmean

from ..evaluation.statistics import t_interval
from ..io_utils import atomic_file
from ..records import read_json
from .config import SweepConfig

# the columns the printed summary shows, per experiment (every metric is in the CSV and JSON)
HEADLINE = {
    "pair": [
        "single_acc",
        "vanilla_acc",
        "random_acc",
        "perm_acc",
        "barrier_perm_acc",
        "barrier_perm_loss",
        "init_single_acc",
        "init_vanilla_acc",
        "init_random_acc",
        "init_perm_acc",
    ],
    "n_way": ["single_acc", "init_single_acc", "init_random_acc", "init_perm_acc"],
    "schedules": [],
    "matchers": [],
    "train": ["single_loss", "single_acc"],
}


def cell_rows(config: SweepConfig, output_dir) -> list[dict]:
    """One row per cell, in the sweep's order: its values, status, metrics and timings."""
    rows = []
    for cell in config.cells:
        folder = Path(output_dir) / "cells" / cell.id
        row = {"cell": cell.id, **cell.values}
        result = folder / "result.json"
        if result.is_file():
            data = read_json(result, "delete that cell's folder to measure it again")
            row["status"] = "done"
            row.update(data["metrics"])
            row.update({k: v for k, v in data.get("timings", {}).items() if k in ("train_s", "cell_s")})
            if data.get("curves"):
                row["curves"] = data["curves"]
        elif (folder / "error.txt").is_file():
            lines = [ln for ln in (folder / "error.txt").read_text().splitlines() if ln.strip()]
            row["status"] = "failed"
            row["error"] = lines[-1] if lines else "unknown error"
        else:
            row["status"] = "missing"
        rows.append(row)
    return rows


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarise(config: SweepConfig, rows: list[dict]) -> list[dict]:
    """Finished cells grouped by every value but the seed: n, and per metric the mean and `<metric>_ci`, the
    half-width of its Student-t 95% interval (n - 1 degrees of freedom; None for one seed)."""
    sweep = config.sweep
    keys = [k for k in (["case"] if sweep.cases else []) + list(sweep.grid) if k != sweep.seed_key]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["status"] == "done":
            groups.setdefault(tuple(repr(row[k]) for k in keys), []).append(row)
    summary = []
    for members in groups.values():
        out = {k: members[0][k] for k in keys}
        out["n"] = len(members)
        metrics = [m for m in members[0] if m not in keys and m not in ("cell", "status", "curves", sweep.seed_key)]
        for m in metrics:
            values = [r.get(m) for r in members if _is_number(r.get(m))]
            if not values:
                continue
            out[m], out[f"{m}_ci"] = t_interval(values)
        curves = [r["curves"] for r in members if "curves" in r]
        if curves:
            out["curves"] = _mean_curves(curves)
        summary.append(out)
    return summary


def _mean_curves(curves: list[dict]) -> dict:
    first = curves[0]
    return {
        ck: {
            mode: {
                "lambdas": c["lambdas"],
                **{
                    m: [fmean(cv[ck][mode][m][i] for cv in curves) for i in range(len(c["lambdas"]))]
                    for m in ("acc", "loss")
                },
            }
            for mode, c in modes.items()
        }
        for ck, modes in first.items()
    }


def write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and k != "curves"]
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def summary_text(config: SweepConfig, summary: list[dict]) -> str:
    """A fixed-width table of the experiment's headline numbers: mean ± the t 95% half-width (with n seeds)."""
    sweep = config.sweep
    keys = [k for k in (["case"] if sweep.cases else []) + list(sweep.grid) if k != sweep.seed_key]
    metrics = HEADLINE[sweep.experiment]
    if sweep.experiment == "n_way" and summary:
        ks = sorted({int(m[4:].split("_", 1)[0]) for m in summary[0] if m.startswith("nway") and not m.endswith("_ci")})
        metrics = metrics + [f"nway{k}_init_perm_acc" for k in ks]
    elif sweep.experiment == "matchers" and summary:
        metrics = [f"{label}:init_perm_acc" for label in sweep.matchers]
    elif sweep.experiment == "schedules" and summary:
        last = max(int(m.rsplit("_t", 1)[1]) for m in summary[0] if m.startswith("sched_") and not m.endswith("_ci"))
        metrics = ["single_acc", "init_perm_acc"] + [
            m for m in summary[0] if m.startswith("sched_") and m.endswith(f"_t{last}")
        ]
    header = [k.rsplit(".", 1)[-1] for k in keys] + ["n"] + metrics
    lines = [header]
    for row in summary:
        cells = [str(row[k]) for k in keys] + [str(row["n"])]
        for m in metrics:
            v, s = row.get(m), row.get(f"{m}_ci")
            cells.append("-" if v is None else f"{v:.4f}" + (f"±{s:.4f}" if s else ""))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
