"""The documents' numbers come from committed reports: the README's demo block is the demo report, rendered."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_demo_numbers_are_the_committed_demo_report():
    demo = load_script("demo_report")
    report = json.loads(demo.REPORT.read_text())
    text = demo.README.read_text()
    block = text[text.index(demo.BEGIN) : text.index(demo.END) + len(demo.END)]
    assert block == demo.render(report), (
        "README's demo block is stale: run `make demo-report` (or `python benchmarks/demo_report.py --readme-only`)"
    )


def test_the_demo_report_covers_seeds_and_cpu_settings():
    report = json.loads(load_script("demo_report").REPORT.read_text())
    assert report["num_seeds"] >= 5
    envs = [run["env"] for run in report["runs"].values()]
    assert {"ATEN_CPU_CAPABILITY": "default"} in envs and {"OMP_NUM_THREADS": "1"} in envs
    for run in report["runs"].values():
        assert 0.75 < run["acc"]["single"] < 0.95 and 0.2 < run["acc"]["permuted_init"] < 0.8
