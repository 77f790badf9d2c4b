"""How long `hf-permerge --help` takes, as a user feels it: a fresh process each time, several runs.

    .venv/bin/python benchmarks/cli_help.py [--runs 20]

Prints the median and the fastest wall time, and the median CPU time (user + system) a run takes: on a busy
machine the wall time waits for a core, the CPU time does not; on an idle one they are close.
"""

from __future__ import annotations

import argparse
import os
import resource
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
    times, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([exe, "--help"], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    print(
        f"hf-permerge --help: median {statistics.median(times):.3f} s, fastest {min(times):.3f} s wall; median "
        f"{statistics.median(cpu):.3f} s CPU; {runs} runs, load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
