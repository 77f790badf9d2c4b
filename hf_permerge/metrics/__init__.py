"""`evaluate` metric modules shipped inside the package, loadable offline.

`load_metric("loss_barrier")` is `evaluate.load(<path of the module>)`. `evaluate` is imported only
when a metric is loaded, since importing it costs seconds and most callers never need it.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
METRICS = ("loss_barrier", "accuracy")


def metric_path(name: str) -> str:
    """Path of a shipped metric module (a directory holding `<name>.py`), for `evaluate.load`."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; the package ships {list(METRICS)}")
    return str(METRICS_DIR / name)


def load_metric(name: str, **kwargs):
    """The shipped metric `name` as an `evaluate.EvaluationModule`; kwargs go to `evaluate.load`.

    A local path never touches the Hub, so this works with HF_HUB_OFFLINE=1; `evaluate` copies the
    module into HF_MODULES_CACHE (under HF_HOME), which must be writable.
    """
    import evaluate  # keep lazy: ~5 s at import (it pulls datasets); `import hf_permerge` must stay light

    return evaluate.load(metric_path(name), **kwargs)


__all__ = ["load_metric", "metric_path", "METRICS", "METRICS_DIR"]
