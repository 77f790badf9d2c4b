"""Run a sweep (a paper figure) with Accelerate: the processes share the cells.

    accelerate launch examples/sweep.py configs/sweeps/fig2_fmnist.yaml --output-dir runs/fig2_fmnist
    accelerate launch --multi_gpu --num_processes 8 examples/sweep.py configs/sweeps/fig2_fmnist.yaml -o runs/fig2

The same as `hf-permerge sweep ...` (or `accelerate launch -m hf_permerge.cli sweep ...`): cell i runs on
process i % world size, finished cells are skipped, and the main process writes the table and figure.
"""

import sys

from hf_permerge.cli import main

GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main([a for a in args if a in GLOBAL_FLAGS] + ["sweep"] + [a for a in args if a not in GLOBAL_FLAGS]))
