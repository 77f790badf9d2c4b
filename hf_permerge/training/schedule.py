"""The learning rate of each step: constant, or a linear warm-up then a cosine decay to 0. A function of the step
alone, so a resumed run continues the schedule exactly."""

from __future__ import annotations

import math


def is_scheduled(tc) -> bool:
    """Whether the learning rate changes during the run (else the optimiser keeps `training.lr` throughout)."""
    return tc.lr_schedule != "constant" or tc.warmup_steps > 0


def lr_at(tc, step: int, total: int) -> float:
    """The learning rate of optimiser step `step` (0-based) of a run of `total` steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return tc.lr
    progress = (step - tc.warmup_steps) / max(1, total - tc.warmup_steps)
    return tc.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
