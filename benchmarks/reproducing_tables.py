"""Markdown tables for REPRODUCING.md, from a sweep's committed results (results.csv, or a results.json).

Cells are grouped by every value but the seed; each row states its n (seeds), each metric prints as
`mean ± h`, h the half-width of the Student-t 95% interval (n - 1 degrees of freedom; for n = 1 the value
alone, no interval). So the page's numbers are regenerated from the files, never copied by hand.

    python benchmarks/reproducing_tables.py benchmarks/results/reproduce-cpu-2026-11-27/fig2 \
        --metrics single_acc vanilla_acc perm_acc barrier_perm_acc init_perm_acc
    python benchmarks/reproducing_tables.py DIR --schedules        # Fig. 3 / 4 right: rows perm@x, columns t
    python benchmarks/reproducing_tables.py DIR --plot docs/figures/x.png [--curves y.png]   # re-render, t band
    python benchmarks/reproducing_tables.py --update REPRODUCING.md   # every table of the page, in place
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shlex
from pathlib import Path

from hf_permerge.evaluation.statistics import t_interval


def load(path: Path) -> list[dict]:
    """One row per cell, from a sweep's folder (its results.csv) or a .json file (a sweep's results.json,
    or a list of rows, or JSON lines, as the benchmark scripts write)."""
    if path.is_dir():
        with (path / "results.csv").open() as f:
            return [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    data = json.loads(path.read_text())
    return data["cells"] if isinstance(data, dict) else data


def _value(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def groups(rows: list[dict], seed_key: str, by=None) -> tuple[list[str], list[tuple[tuple, list[dict]]]]:
    """The grouping keys (`by`, else every value column of a sweep but the seed) and the finished cells per
    group, in file order."""
    first = list(rows[0])
    keys = by or [k for k in first[1 : first.index("status")] if k != seed_key]
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("status", "done") == "done":
            out.setdefault(tuple(row[k] for k in keys), []).append(row)
    return keys, list(out.items())


def fmt(values: list, digits: int, n: int) -> str:
    """`mean ± h`; the count is added where it is not the row's n (a metric missing in some cells)."""
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return "–"
    mean, half = t_interval(values)
    text = f"{mean:.{digits}f}" + ("" if half is None else f" ± {half:.{digits}f}")
    return text if len(values) == n else f"{text} (n = {len(values)})"


LABELS = {"single": "single net", "vanilla": "vanilla avg", "perm": "perm avg", "random": "random-perm avg"}


def label(metric: str) -> str:
    """A short column name: init_perm_acc -> `init: perm avg acc`, nway8_init_perm_acc -> `k=8 init: perm avg acc`."""
    if ":" in metric:  # App. B: <matcher>:<metric>
        matcher, metric = metric.split(":", 1)
        return f"{matcher}: {label(metric)}"
    prefix = ""
    if metric.startswith("nway"):
        k, metric = metric[4:].split("_", 1)
        prefix = f"k={k} "
    if metric.startswith("init_"):
        prefix, metric = prefix + "init: ", metric[5:]
    words = metric.split("_")
    return prefix + " ".join(words if words[0] == "barrier" else [LABELS.get(w, w) for w in words])


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def metric_table(rows, seed_key, metrics, digits, transpose=False, by=None) -> str:
    keys, grouped = groups(rows, seed_key, by)
    if transpose:  # one row per metric, one column per group
        header = ["metric"] + [
            ", ".join(str(v) for v in values) + f" (n = {len(members)})" for values, members in grouped
        ]
        return table(
            header,
            [
                [label(m)] + [fmt([r.get(m) for r in members], digits, len(members)) for _, members in grouped]
                for m in metrics
            ],
        )
    lines = [
        [str(v) for v in values]
        + [str(len(members))]
        + [fmt([r.get(m) for r in members], digits, len(members)) for m in metrics]
        for values, members in grouped
    ]
    return table([k.rsplit(".", 1)[-1] for k in keys] + ["n"] + [label(m) for m in metrics], lines)


def schedule_tables(rows, seed_key, digits) -> str:
    """Per group: one row per permutation (perm@x, current, vanilla), one column per training step t."""
    keys, grouped = groups(rows, seed_key)
    out = []
    for values, members in grouped:
        series: dict[str, dict[int, str]] = {}
        for m in members[0]:
            if m.startswith("sched_"):
                name, step = m[len("sched_") :].rsplit("_t", 1)
                series.setdefault(name, {})[int(step)] = m
        steps = sorted({t for s in series.values() for t in s})
        title = ", ".join([f"{k}={v}" for k, v in zip(keys, values)] + [f"n = {len(members)}"])
        out.append(
            f"{title}\n\n"
            + table(
                ["permutation"] + [f"t = {t}" for t in steps],
                [
                    [name] + [fmt([r.get(series[name][t]) for r in members], digits, len(members)) for t in steps]
                    for name in series
                ],
            )
        )
    return "\n\n".join(out)


def plot(results: Path, path: Path, curves_path: Path | None) -> None:
    """Re-render the sweep's figure (and its interpolation curves) with the package's plots from its
    results.json: mean ± Student-t 95% band over seeds."""
    from types import SimpleNamespace

    from PIL import Image

    from hf_permerge.sweeps import figures
    from hf_permerge.sweeps.config import SweepSection
    from hf_permerge.sweeps.tables import summarise

    data = json.loads((results / "results.json" if results.is_dir() else results).read_text())
    config = SimpleNamespace(sweep=SweepSection(**data["sweep"]))
    summary = summarise(config, data["cells"])
    if path:
        draw = {
            "pair": figures.plot_pair,
            "n_way": figures.plot_n_way,
            "schedules": figures.plot_schedules,
            "matchers": figures.plot_matchers,
        }[config.sweep.experiment]
        draw(config, summary, path)
    if curves_path:
        figures.plot_curves(config, summary, curves_path)
    for written in (path, curves_path):
        if written:  # 256 colours: the same picture in a third of the bytes
            Image.open(written).convert("RGB").quantize(256).save(written, optimize=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, nargs="?", help="a sweep's output folder, or a results .json file")
    p.add_argument("--metrics", nargs="+", default=[], help="columns (results.csv names)")
    p.add_argument("--schedules", action="store_true", help="tables of the sched_<perm>_t<step> metrics")
    p.add_argument("--transpose", action="store_true", help="one row per metric, one column per group")
    p.add_argument("--by", nargs="+", help="group by these keys (default: a sweep's values but the seed)")
    p.add_argument("--where", nargs="+", default=[], help="KEY=VALUE: keep only these rows")
    p.add_argument("--seed-key", default="training.seed")
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--plot", type=Path, help="also re-render the sweep's figure here (t 95%% band)")
    p.add_argument("--curves", type=Path, help="and its interpolation curves (sweeps with curves: true)")
    p.add_argument(
        "--update",
        type=Path,
        metavar="PAGE",
        help="regenerate every table of PAGE that follows a line `Table: `python benchmarks/reproducing_tables.py ARGS``",
    )
    return p


def render(args: argparse.Namespace) -> str:
    rows = load(args.results)
    for cond in args.where:
        key, value = cond.split("=", 1)
        rows = [r for r in rows if str(r.get(key)) == value]
    parts = []
    if args.metrics:
        parts.append(metric_table(rows, args.seed_key, args.metrics, args.digits, args.transpose, args.by))
    if args.schedules:
        parts.append(schedule_tables(rows, args.seed_key, args.digits))
    if args.plot or args.curves:
        plot(args.results, args.plot, args.curves)
    return "\n\n".join(parts)


TABLE_LINE = re.compile(r"Table: `python benchmarks/reproducing_tables.py (.+)`")
OLD_TABLE = re.compile(r"^\s*$|^\||^(.*, )?n = \d+$")  # blank, a table row, a schedule table's title


def update(page: Path) -> None:
    lines, out, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        out.append(lines[i])
        match = TABLE_LINE.fullmatch(lines[i])
        i += 1
        if match:
            while i < len(lines) and OLD_TABLE.match(lines[i]):
                i += 1
            out += ["", render(parser().parse_args(shlex.split(match.group(1)))), ""]
    page.write_text("\n".join(out) + "\n")


def main() -> None:
    args = parser().parse_args()
    if args.update:
        update(args.update)
    else:
        print(render(args))


if __name__ == "__main__":
    main()
