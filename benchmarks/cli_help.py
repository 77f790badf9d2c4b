"""How long `hf-permerge --help` takes, as a user feels it: a fresh process each time, several runs.

    .venv/bin/python benchmarks/cli_help.py [--runs 20]

Prints the median and the fastest wall time; the command must not import torch or transformers.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    exe = shutil.which("hf-permerge", path=str(Path(sys.executable).parent)) or shutil.which("hf-permerge")
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([exe, "--help"], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    print(f"hf-permerge --help: median {statistics.median(times):.3f} s, fastest {min(times):.3f} s over {runs} runs")


if __name__ == "__main__":
    main()
