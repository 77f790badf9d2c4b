"""Stopping a net when its held-out curve has flattened (`training.stop_when_flat`).

The criterion reads only the curve the trainer already logs: the held-out (test) loss at every evaluation
(`training.eval_steps`, and epoch ends when `training.eval_each_epoch`). After evaluation n, a net is *flat* when
the best of its last `patience` evaluations is not more than `min_delta` nats below the best of all the
evaluations before them: `min(L[n-P+1..n]) > min(L[1..n-P]) - min_delta`. So a curve still falling by more than
`min_delta` over `patience` evaluations goes on, and one that has levelled off or turned up (overfitting) stops.
The net is kept as it is at the stopping step (its `final` checkpoint), not rolled back to its best evaluation;
the record says both. `training.epochs` (and `max_steps`) stay the upper bound: a net that never flattens stops
there, and its record says so.
"""

from __future__ import annotations


def is_flat(losses: list[float], patience: int, min_delta: float) -> bool:
    """Whether a held-out loss curve (one value per evaluation, oldest first) has flattened (module docstring)."""
    if len(losses) <= patience:
        return False
    return min(losses[-patience:]) > min(losses[:-patience]) - min_delta


def held_out_curve(log_history: list[dict]) -> list[float]:
    """The held-out losses of a net's log_history, oldest first (the entries that hold one)."""
    return [h["test_loss"] for h in log_history if "test_loss" in h]


def stop_record(log_history: list[dict], step: int, flat: bool, criterion: dict) -> dict:
    """What a net's log_history.json and pair.json say of its stop: the step, why (`flat`: the criterion held;
    `end`: the run's last step came first), the criterion, and its best evaluation."""
    evals = [h for h in log_history if "test_loss" in h]
    best = min(evals, key=lambda h: h["test_loss"]) if evals else None
    return {
        "step": step,
        "reason": "flat" if flat else "end",
        "criterion": {"metric": "test_loss", **criterion},
        "evaluations": len(evals),
        "best": {"step": best["step"], "test_loss": best["test_loss"]} if best else None,
    }
