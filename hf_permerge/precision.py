"""Arithmetic precision of matmuls: one switch shared by training and evaluation.

fp32 is the default for the science. "tf32" runs CUDA float32 matmuls on tensor cores (inputs rounded to
10-bit mantissas, float32 sums), about twice as fast for wide nets. It is CUDA-only: the CPU computes
float32 either way.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def tf32_matmuls(precision: str):
    """Within the block, CUDA float32 matmuls use TF32 when `precision == "tf32"`; PyTorch's own setting
    is restored after, so nothing outside the block (another run in the same process) changes."""
    if precision != "tf32":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
