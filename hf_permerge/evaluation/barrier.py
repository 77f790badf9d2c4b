"""The loss barrier, paper eq. (2): the one definition every caller (metric module, reports) uses.

Convention: the value at `lambda` belongs to the network (1 - lambda) * theta_a + lambda * theta_b,
so v(0) is theta_a and v(1) is theta_b. Eq. (2) writes the same quantity with theta_1 = theta_b,
theta_2 = theta_a:

    barrier = max_lambda  v(lambda) - ((1 - lambda) v(0) + lambda v(1))        (kind="loss")
    barrier = max_lambda  ((1 - lambda) v(0) + lambda v(1)) - v(lambda)        (kind="accuracy")

Accuracy flips the sign because higher is better: its barrier is how far the curve dips below the
straight line between the endpoint accuracies. Both are >= 0, since the endpoints are on the line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

KINDS = ("loss", "accuracy")


class Barrier(NamedTuple):
    """`barrier`: the largest gap between curve and chord; `lam`: the lambda where it occurs."""

    barrier: float
    lam: float


def loss_barrier(lambdas: Sequence[float], values: Sequence[float], kind: str = "loss") -> Barrier:
    """Eq. (2) from per-lambda values measured on a curve; lambdas may come in any order.

    The maximum is taken over the lambdas given (the paper's max over [0, 1] on a grid); ties go
    to the smallest lambda, so a flat curve reports lambda = 0.
    """
    if kind not in KINDS:
        raise ValueError(
            f"kind={kind!r} is not supported; choose one of {list(KINDS)} "
            "('accuracy' flips the sign, since higher accuracy is better)"
        )
    lam = np.asarray(lambdas, dtype=np.float64)
    val = np.asarray(values, dtype=np.float64)
    if lam.ndim != 1 or val.ndim != 1:
        raise ValueError(f"lambdas and values must be flat sequences, got shapes {lam.shape} and {val.shape}")
    if len(lam) != len(val):
        raise ValueError(f"lambdas and values must have the same length, got {len(lam)} and {len(val)}")
    if not (np.all(np.isfinite(lam)) and np.all(np.isfinite(val))):
        raise ValueError(
            "lambdas and values must be finite (a NaN/inf value usually means a diverged "
            f"network): lambdas={lam.tolist()}, values={val.tolist()}"
        )
    order = np.argsort(lam, kind="stable")
    lam, val = lam[order], val[order]
    if np.any((lam < 0.0) | (lam > 1.0)):
        raise ValueError(
            f"lambdas must lie in [0, 1] (eq. 2's barrier is on the segment between the two nets), got {lam.tolist()}"
        )
    if len(lam) < 2 or lam[0] != 0.0 or lam[-1] != 1.0:
        raise ValueError(
            f"lambdas must include both endpoints 0 and 1 (eq. 2 compares the curve with the "
            f"line between them), got {lam.tolist()}"
        )
    if np.any(np.diff(lam) == 0):
        raise ValueError(f"lambdas must not repeat, got {lam.tolist()}")
    chord = (1.0 - lam) * val[0] + lam * val[-1]
    gap = val - chord if kind == "loss" else chord - val
    i = int(np.argmax(gap))
    return Barrier(float(gap[i]), float(lam[i]))
