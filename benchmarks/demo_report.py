"""The README's demo numbers and how much they vary: `make demo-report`.

Runs the demo (`hf-permerge run configs/fmnist_mlp_2x512.yaml`) for seeds 0-4 on this machine as it is, and
seed 0 again under the portable instruction set (`ATEN_CPU_CAPABILITY=default`) and on one thread. Writes
`benchmarks/results/demo/report.json` and rewrites the README's block between the demo markers from it;
`tests/test_docs.py` fails when the two disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "results" / "demo" / "report.json"
README = ROOT / "README.md"
CONFIG = "configs/fmnist_mlp_2x512.yaml"
BEGIN, END = "<!-- demo-report:begin -->", "<!-- demo-report:end -->"
COLUMNS = {
    "single": "single net",
    "vanilla": "vanilla avg",
    "permuted": "perm avg",
    "permuted_init": "perm avg of inits",
}
VARIANTS = {
    "seed 0": (0, {}),
    **{f"seed {s}": (s, {}) for s in range(1, 5)},
    "seed 0, ATEN_CPU_CAPABILITY=default": (0, {"ATEN_CPU_CAPABILITY": "default"}),
    "seed 0, OMP_NUM_THREADS=1": (0, {"OMP_NUM_THREADS": "1"}),
}


def headline(report: dict) -> dict[str, float]:
    """Test accuracy of the single nets (mean), the vanilla and permuted midpoints, and the permuted inits'."""
    mid = report["midpoint"]
    return {
        "single": statistics.fmean(e["test"]["acc"] for e in report["endpoints"][:2]),
        "vanilla": mid["final"]["vanilla"]["test"]["acc"],
        "permuted": mid["final"]["permuted"]["test"]["acc"],
        "permuted_init": mid["init"]["permuted"]["test"]["acc"],
    }


def run_variant(seed: int, env: dict[str, str], out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "hf_permerge.cli",
        "-q",
        "run",
        CONFIG,
        "-o",
        str(out),
        "--set",
        f"training.seed={seed}",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    from hf_permerge.reporting.report import summary_table

    return {
        "seed": seed,
        "env": env,
        "wall_s": round(wall, 1),
        "acc": headline(report),
        "summary": summary_table(report),
    }


def spread(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per column over the seeds: mean, Student-t 95% half-width, min and max."""
    from scipy import stats

    out = {}
    for key in COLUMNS:
        values = [r["acc"][key] for r in runs]
        half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
        out[key] = {"mean": statistics.fmean(values), "t95": half, "min": min(values), "max": max(values)}
    return out


def render(report: dict) -> str:
    """The README block: seed 0's summary, then the spread over seeds and over CPU settings."""
    runs = report["runs"]
    head = " | ".join(COLUMNS.values())
    lines = [
        BEGIN,
        f"Measured with `make demo-report` (`{report['command']}`) at commit {report['commit']} on "
        f"{report['machine']}; seed 0 prints:",
        "",
        "```",
        runs["seed 0"]["summary"],
        "```",
        "",
        "Test accuracy, and how much it moves (the permuted inits' midpoint is the most sensitive number):",
        "",
        f"| | {head} |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, run in runs.items():
        lines.append(f"| {name} | " + " | ".join(f"{run['acc'][k]:.4f}" for k in COLUMNS) + " |")
    s = report["spread_over_seeds"]
    lines.append(
        f"| seeds 0-4: mean ± t95 (n = {report['num_seeds']}) | "
        + " | ".join(f"{s[k]['mean']:.3f} ± {s[k]['t95']:.3f}" for k in COLUMNS)
        + " |"
    )
    lines.append(END)
    return "\n".join(lines)


def write_readme(report: dict) -> None:
    text = README.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    README.write_text(text[:start] + render(report) + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme-only", action="store_true", help="rewrite the README block from the saved report")
    args = parser.parse_args()
    if not args.readme_only:
        runs = {}
        with tempfile.TemporaryDirectory() as tmp:
            for i, (name, (seed, env)) in enumerate(VARIANTS.items()):
                print(f"[{i + 1}/{len(VARIANTS)}] {name}", flush=True)
                runs[name] = run_variant(seed, env, Path(tmp) / str(i))
        seeds = [r for name, r in runs.items() if not r["env"]]
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        report = {
            "command": f"hf-permerge run {CONFIG} --set training.seed=S",
            "commit": commit,
            "machine": f"{os.cpu_count()} cores, {cpu}",
            "num_seeds": len(seeds),
            "runs": runs,
            "spread_over_seeds": spread(seeds),
        }
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    write_readme(json.loads(REPORT.read_text()))
    print(f"wrote {REPORT.relative_to(ROOT)} and the README's demo block")


if __name__ == "__main__":
    main()
