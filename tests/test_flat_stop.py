"""training.stop_when_flat: each net stops when its held-out curve has flattened, kept as it is at that step, and
its record says where and why; the run's end stays the upper bound."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_permerge.config import ConfigError
from hf_permerge.training import PairTrainer
from hf_permerge.training.flat_stop import is_flat


def test_flat_when_the_last_evaluations_gain_less_than_min_delta_over_the_best_before():
    assert not is_flat([5.0, 4.0, 3.9], patience=2, min_delta=0.01)  # too few: 2 evaluations need a third before
    assert not is_flat([5.0, 4.0, 3.9, 3.8], patience=2, min_delta=0.01)  # 3.8 < 4.0 - 0.01: still falling
    assert is_flat([5.0, 4.0, 3.995, 3.999], patience=2, min_delta=0.01)  # 0.005 gained: flat
    assert is_flat([5.0, 4.0, 4.1, 4.2], patience=2, min_delta=0.0)  # turned up (overfitting): flat


def test_nets_stop_at_the_first_flat_evaluation_as_they_were_there(tmp_path, tiny_lm_config):
    """patience 1, min_delta 10 nats: no evaluation gains that much, so each net stops at its second evaluation
    (step 8 of 12), its final checkpoint the net of an unstopped run at step 8."""
    training = {"eval_steps": 4, "eval_each_epoch": False, "lr_schedule": "constant"}
    stopped = tiny_lm_config(training={**training, "stop_when_flat": {"patience": 1, "min_delta": 10.0}})
    PairTrainer(stopped, tmp_path / "stopped", progress=False).train()
    full = tiny_lm_config(training={**training, "save_steps": [3, 8]})
    PairTrainer(full, tmp_path / "full", progress=False).train()
    pair = json.loads((tmp_path / "stopped/pair.json").read_text())
    for i, net in enumerate(pair["nets"]):
        assert net["stop"]["step"] == 8 and net["stop"]["reason"] == "flat"
        assert net["stop"]["criterion"] == {"metric": "test_loss", "patience": 1, "min_delta": 10.0}
        assert [h["step"] for h in net["log_history"]] == [4, 8]
        assert net["stop"]["best"]["step"] in (4, 8) and net["stop"]["evaluations"] == 2
        assert not list((tmp_path / "stopped" / f"net_{i}").glob("resume-step-*"))
        a = load_file(str(tmp_path / "stopped" / f"net_{i}/final/model.safetensors"))
        b = load_file(str(tmp_path / "full" / f"net_{i}/step-8/model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "stop" not in json.loads((tmp_path / "full/pair.json").read_text())["nets"][0]


def test_a_curve_still_falling_trains_to_the_end_and_says_so(tmp_path, tiny_lm_config):
    cfg = tiny_lm_config(training={"eval_steps": 2, "stop_when_flat": {"patience": 50, "min_delta": 0.0}})
    PairTrainer(cfg, tmp_path / "p", progress=False).train()
    for net in json.loads((tmp_path / "p/pair.json").read_text())["nets"]:
        assert net["stop"]["step"] == 12 and net["stop"]["reason"] == "end"


def test_a_criterion_without_evaluations_is_refused(tiny_lm_config):
    with pytest.raises(ConfigError, match="stop_when_flat reads the held-out curve"):
        tiny_lm_config(training={"eval_each_epoch": False, "stop_when_flat": {"patience": 2}})
