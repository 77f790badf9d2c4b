"""The paired difference of two metrics over every finished cell of a sweep (all widths and seeds pooled), with
its Student-t 95% interval: e.g. whether averaged permuted inits beat the vanilla inits' average, pair by pair.

    python benchmarks/paired_difference.py benchmarks/results/vision-convnext \
        activation:init_perm_acc activation:init_vanilla_acc
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reproducing_tables import load  # noqa: E402
from hf_permerge.evaluation.statistics import t_interval  # noqa: E402


def paired_difference(rows: list[dict], first: str, second: str) -> tuple[int, float, float | None]:
    """(n, mean, half-width) of first - second over the rows that hold both as numbers."""
    diffs = [
        r[first] - r[second]
        for r in rows
        if r.get("status", "done") == "done" and all(isinstance(r.get(k), (int, float)) for k in (first, second))
    ]
    mean, half = t_interval(diffs)
    return len(diffs), mean, half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a sweep folder (results.csv) or a results .json")
    parser.add_argument("first")
    parser.add_argument("second")
    args = parser.parse_args()
    n, mean, half = paired_difference(load(args.results), args.first, args.second)
    print(f"{args.first} - {args.second}: {mean:+.3f} ± {half:.3f} (n = {n}, Student-t 95%)")


if __name__ == "__main__":
    main()
