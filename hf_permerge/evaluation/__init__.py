"""Evaluation: the barrier of eq. (2), batched interpolation curves, and the Fig. 1 plane."""

from .barrier import Barrier, loss_barrier
from .interpolation import (
    combine_state_dicts,
    default_lambdas,
    evaluate_combinations,
    evaluate_curve,
    evaluate_model,
    interpolate_state_dicts,
    metrics_from_logits,
    tempered_nll,
)
from .plane import evaluate_plane, plane_coefficients, plane_coordinates

__all__ = [
    "Barrier",
    "loss_barrier",
    "default_lambdas",
    "interpolate_state_dicts",
    "combine_state_dicts",
    "evaluate_model",
    "evaluate_combinations",
    "evaluate_curve",
    "metrics_from_logits",
    "tempered_nll",
    "evaluate_plane",
    "plane_coordinates",
    "plane_coefficients",
]
