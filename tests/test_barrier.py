"""The barrier of eq. (2): known values, the accuracy sign flip, input errors, and the offline metric modules."""

import json
import os
import subprocess
import sys

import pytest

from hf_permerge import PermMLPConfig, PermMLPForImageClassification
from hf_permerge.data.tensors import load_tensors
from hf_permerge.evaluation import default_lambdas, evaluate_curve, loss_barrier


def test_known_bump_gives_its_value():
    assert loss_barrier([0.0, 0.5, 1.0], [0.0, 1.0, 0.0]) == (1.0, 0.5)


def test_barrier_is_measured_from_the_chord_between_unequal_endpoints():
    # chord at 0.25 is 1.5, at 0.5 is 2.0: the gaps are 1.0 and 0.5
    result = loss_barrier([0.0, 0.25, 0.5, 1.0], [1.0, 2.5, 2.5, 3.0])
    assert result.barrier == pytest.approx(1.0) and result.lam == 0.25


def test_convex_curve_has_zero_barrier():
    lams = default_lambdas(21)
    values = [(lam - 0.3) ** 2 + 0.5 * lam for lam in lams]
    assert loss_barrier(lams, values) == (0.0, 0.0)


def test_accuracy_barrier_flips_the_sign():
    lams, accs = [0.0, 0.5, 1.0], [0.9, 0.5, 0.8]
    assert loss_barrier(lams, accs, kind="accuracy").barrier == pytest.approx(0.35)
    assert loss_barrier(lams, accs, kind="accuracy").lam == 0.5
    assert loss_barrier(lams, accs, kind="loss").barrier == 0.0  # a dip is no loss barrier


def test_lambdas_may_come_in_any_order():
    assert loss_barrier([1.0, 0.5, 0.0], [0.0, 1.0, 0.0]) == loss_barrier([0.0, 0.5, 1.0], [0.0, 1.0, 0.0])


@pytest.mark.parametrize(
    "lambdas, values, kind, message",
    [
        ([0.0, 0.5], [1.0, 2.0], "loss", "endpoints 0 and 1"),
        ([0.1, 0.5, 1.0], [1.0, 2.0, 1.0], "loss", "endpoints 0 and 1"),
        ([0.0, 0.5, 1.0], [1.0, 2.0], "loss", "same length"),
        ([0.0, 0.5, 1.0], [1.0, float("nan"), 1.0], "loss", "finite"),
        ([0.0, float("inf"), 1.0], [1.0, 2.0, 1.0], "loss", "finite"),
        ([0.0, 0.5, 0.5, 1.0], [1.0, 2.0, 2.0, 1.0], "loss", "repeat"),
        ([0.0, 1.5, 1.0], [1.0, 2.0, 1.0], "loss", r"must lie in \[0, 1\]"),
        ([[0.0, 1.0]], [[1.0, 1.0]], "loss", "flat"),
        ([0.0, 1.0], [1.0, 1.0], "acc", "choose one of"),
    ],
)
def test_bad_inputs_raise_clear_errors(lambdas, values, kind, message):
    with pytest.raises(ValueError, match=message):
        loss_barrier(lambdas, values, kind=kind)


def test_barrier_of_net_with_itself_is_zero():
    net = PermMLPForImageClassification(PermMLPConfig(depth=2, width=32, seed=0))
    test = load_tensors("fashion_mnist", "test").subset(2000, seed=0)
    curve = evaluate_curve(net, net, net, default_lambdas(), {"test": test})["test"]
    assert loss_barrier(default_lambdas(), curve["loss"]).barrier == pytest.approx(0.0, abs=1e-5)
    assert loss_barrier(default_lambdas(), curve["acc"], kind="accuracy").barrier == pytest.approx(0.0, abs=1e-9)


def test_barrier_of_a_measured_curve_is_its_midpoint_excess():
    """On a 3-point curve, eq. (2) is the midpoint's excess over the endpoints' mean (or 0)."""
    a, b = (PermMLPForImageClassification(PermMLPConfig(depth=2, width=32, seed=s)) for s in (0, 1))
    test = load_tensors("fashion_mnist", "test").subset(2000, seed=0)
    curve = evaluate_curve(a, a, b, [0.0, 0.5, 1.0], {"test": test})["test"]
    chord = (curve["nll_tempered"][0] + curve["nll_tempered"][2]) / 2
    assert loss_barrier([0.0, 0.5, 1.0], curve["nll_tempered"]).barrier == pytest.approx(
        max(0.0, curve["nll_tempered"][1] - chord), abs=1e-6
    )


OFFLINE_SCRIPT = r"""
import json, sys
import hf_permerge.evaluation, hf_permerge.metrics
assert "evaluate" not in sys.modules, "importing the package must not import evaluate"
import evaluate
from hf_permerge.evaluation import loss_barrier
from hf_permerge.metrics import load_metric, metric_path

lams, vals = [0.0, 0.25, 0.5, 0.75, 1.0], [0.3, 0.9, 1.4, 0.8, 0.5]
by_dir = evaluate.load(metric_path("loss_barrier"))
by_file = evaluate.load(metric_path("loss_barrier") + "/loss_barrier.py")
by_name = load_metric("loss_barrier")
acc = load_metric("accuracy")
out = {
    "dir": by_dir.compute(lambdas=lams, values=vals),
    "file": by_file.compute(lambdas=lams, values=vals),
    "name_acc": by_name.compute(lambdas=lams, values=[0.9, 0.7, 0.6, 0.7, 0.8], kind="accuracy"),
    "fn": list(loss_barrier(lams, vals)),
    "fn_acc": list(loss_barrier(lams, [0.9, 0.7, 0.6, 0.7, 0.8], kind="accuracy")),
    "accuracy": acc.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]),
    "features": sorted(by_dir.features), "acc_features": sorted(acc.features),
    "citation": by_dir.citation, "description": by_dir.description,
}
print("RESULT" + json.dumps(out))
"""


def test_metric_module_loads_offline(tmp_path):
    """evaluate.load on the shipped paths with the Hub switched off and a fresh, writable HF_HOME."""
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
    }
    for var in ("HF_MODULES_CACHE", "HF_METRICS_CACHE", "HF_EVALUATE_CACHE", "HF_DATASETS_CACHE"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    barrier, lam = out["fn"]
    assert barrier == pytest.approx(1.0) and lam == 0.5
    for key in ("dir", "file"):
        assert out[key] == {"barrier": barrier, "lambda": lam}
    assert out["name_acc"] == {"barrier": out["fn_acc"][0], "lambda": out["fn_acc"][1]}
    assert out["accuracy"] == {"accuracy": 0.75}
    assert out["features"] == ["lambdas", "values"] and out["acc_features"] == ["predictions", "references"]
    assert "Random initialisations performing above chance" in out["citation"]
    assert "eq. 2" in out["description"]
    assert (tmp_path / "hf_home" / "modules").is_dir()  # evaluate used the fresh HF_HOME, not ~/.cache
