"""Sweeps: a grid of run configs (one cell each), shared among Accelerate processes, one table and figure.

from hf_permerge.sweeps import load_sweep_config, run_sweep
run_sweep(load_sweep_config("configs/sweeps/fig2_fmnist_smoke.yaml"), "runs/fig2_smoke")
"""

from .config import Cell, SweepConfig, SweepSection, load_sweep_config, sweep_config_from_dict
from .runner import SweepResult, run_sweep

__all__ = [
    "Cell",
    "SweepConfig",
    "SweepSection",
    "SweepResult",
    "load_sweep_config",
    "run_sweep",
    "sweep_config_from_dict",
]
