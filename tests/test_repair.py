"""REPAIR and BatchNorm reset: target statistics reached, endpoints untouched, BN statistics recomputed exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from hf_permerge.data import load_tensors
from hf_permerge.merging import PermMerger
from hf_permerge.merging.repair import repair, reset_bn_statistics, unit_statistics
from hf_permerge.models import (
    PermCNNConfig,
    PermCNNForImageClassification,
    PermMLPConfig,
    PermMLPForImageClassification,
)


@pytest.fixture(scope="module")
def train_split(tiny_fmnist):
    return load_tensors("fashion_mnist", "train", data_dir=tiny_fmnist)


def averaged(a, b, alpha=0.5):
    merged = copy.deepcopy(a)
    sb = b.state_dict()
    merged.load_state_dict(
        {k: (1 - alpha) * v + alpha * sb[k] if v.is_floating_point() else v for k, v in a.state_dict().items()}
    )
    return merged


def pair(cls, **config):
    cfg_class = PermMLPConfig if cls is PermMLPForImageClassification else PermCNNConfig
    return cls(cfg_class(seed=1, **config)).eval(), cls(cfg_class(seed=2, **config)).eval()


@pytest.mark.parametrize(
    "cls,config",
    [
        (PermMLPForImageClassification, {"depth": 3, "width": 32, "bias": True}),
        (PermCNNForImageClassification, {"layers": "8-avg-16", "bias": True}),
        (PermCNNForImageClassification, {"layers": "8-avg-16", "batch_norm": True}),
    ],
)
def test_repair_sets_preactivation_mean_and_std_to_the_interpolation(cls, config, train_split):
    a, b = pair(cls, **config)
    alpha = 0.3
    merged = averaged(a, b, alpha)
    data = train_split.subset(400, seed=0)
    modules = [g.preactivation for g in a.permutation_spec().groups]
    before = unit_statistics(merged, modules, data.pixel_values)
    repair(merged, [a, b], data, [1 - alpha, alpha], num_examples=None)
    sa, sb, sm = (unit_statistics(m, modules, data.pixel_values) for m in (a, b, merged))
    for m in modules:
        mean_t = (1 - alpha) * sa[m].mean + alpha * sb[m].mean
        std_t = (1 - alpha) * sa[m].std + alpha * sb[m].std
        assert not torch.allclose(before[m].std, std_t, rtol=1e-2)  # there was something to repair
        torch.testing.assert_close(sm[m].mean, mean_t, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sm[m].std, std_t, atol=1e-4, rtol=1e-4)


def test_repair_without_bias_scales_each_unit_by_the_least_squares_fit_of_the_repair_map(train_split):
    """A bias-free layer cannot take a shift: each unit of the first layer is scaled by the s minimising
    sum over samples of (s z - (a z + b))^2, where a z + b is the full REPAIR map of that unit."""
    a, b = pair(PermMLPForImageClassification, depth=2, width=32, bias=False)
    merged = averaged(a, b)
    data = train_split.subset(400, seed=0)
    x = data.pixel_values.flatten(1).double()
    z = x @ merged.layers[0].weight.detach().double().T  # (samples, units) before repair
    sa, sb = (unit_statistics(m, ["layers.0"], data.pixel_values)["layers.0"] for m in (a, b))
    a_map = 0.5 * (sa.std + sb.std) / z.std(0, unbiased=False)
    b_map = 0.5 * (sa.mean + sb.mean) - a_map * z.mean(0)
    expected = (z * (a_map * z + b_map)).sum(0) / z.square().sum(0)
    before = merged.layers[0].weight.detach().clone()
    repair(merged, [a, b], data, num_examples=None)
    scale = (merged.layers[0].weight.detach() / before).double()
    torch.testing.assert_close(scale, expected[:, None].expand_as(scale), rtol=1e-4, atol=1e-6)
    assert merged.layers[0].bias is None and merged.layers[1].bias is None  # architecture unchanged


@pytest.fixture
def merger(tiny_pair, tiny_fmnist):
    m = PermMerger.from_pretrained(tiny_pair)
    m.align(load_tensors("fashion_mnist", "train", data_dir=tiny_fmnist), num_examples=1000)
    return m


def test_repair_at_alpha_zero_leaves_net_0_unchanged(merger, tiny_fmnist):
    x = load_tensors("fashion_mnist", "test", data_dir=tiny_fmnist).pixel_values[:300]
    repaired = merger.merge(0.0, repair="repair", repair_examples=500)
    with torch.no_grad():
        torch.testing.assert_close(
            repaired(pixel_values=x).logits, merger.load(0)(pixel_values=x).logits, atol=1e-4, rtol=1e-4
        )


def test_merge_records_the_repair_setting(merger, tmp_path, caplog):
    """The tiny pair's MLP has no biases: REPAIR could only rescale its layers, and says so (log, record, card)."""
    with caplog.at_level("WARNING"):
        merger.merge(0.5, repair="repair", repair_examples=500)
    assert "1 of 1 corrected layers have no bias (layers.0)" in caplog.text and "model.bias=true" in caplog.text
    assert merger.merge_settings()["merge"]["repair"] == "repair"
    merger.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "merge_config.json").read_text())
    assert config["merge"]["repair"] == "repair" and config["merge"]["repair_scale_only"] == ["layers.0"]
    assert (
        "1 layer(s) without a bias (layers.0) could only be rescaled" in (tmp_path / "merged" / "README.md").read_text()
    )
    merger.merge_all()
    assert merger.merge_settings()["merge"].get("repair") is None


def test_repaired_merge_differs_from_plain_merge_and_stays_in_the_architecture(merger):
    plain, repaired = merger.merge(0.5), merger.merge(0.5, repair="repair", repair_examples=500)
    assert set(plain.state_dict()) == set(repaired.state_dict())
    assert not torch.equal(plain.layers[0].weight, repaired.layers[0].weight)
    repaired_all = merger.merge_all(repair="repair", repair_examples=500)
    assert not torch.equal(merger.merge_all().layers[0].weight, repaired_all.layers[0].weight)


def test_report_holds_the_repaired_midpoints(merger, tiny_fmnist):
    from hf_permerge.config import config_from_dict
    from hf_permerge.reporting.report import build_report

    evaluation = config_from_dict({"evaluation": {"repair": "repair", "n_way": False, "num_lambdas": 3}}).evaluation
    assert evaluation.repair == ["repair"]  # one mode is a list of one
    splits = {"test": load_tensors("fashion_mnist", "test", data_dir=tiny_fmnist)}
    merger.merge(0.5)
    report = build_report(merger, evaluation, splits, progress=False)
    assert set(report["repair"]) == {"repair"}
    rep = report["repair"]["repair"]
    assert set(rep["midpoint"]) == {"vanilla", "permuted"}
    mean_acc = sum(e["test"]["acc"] for e in report["endpoints"][:2]) / 2
    assert rep["barrier_midpoint"]["permuted"]["test"]["acc"] == pytest.approx(
        mean_acc - rep["midpoint"]["permuted"]["test"]["acc"]
    )
    assert merger.merge_settings()["merge"].get("repair") is None  # the report did not change the last merge


def test_bad_repair_settings_are_refused(merger):
    with pytest.raises(ValueError, match="repair='renorm' is not supported"):
        merger.merge(0.5, repair="renorm")
    with pytest.raises(ValueError, match="no BatchNorm layers"):
        merger.merge(0.5, repair="reset_bn")


def test_reset_bn_recomputes_running_statistics_exactly(train_split):
    """momentum=None over equal batches: the running stats are the average of the batches' mean and unbiased
    variance, each layer seeing the batch-normalised outputs of the layers before it (train-mode forward)."""
    model, _ = pair(PermCNNForImageClassification, layers="8-avg-16", batch_norm=True)
    with torch.no_grad():
        for block in model.blocks:  # stale statistics, as after interpolation
            block.norm.running_mean.uniform_(-1, 1)
            block.norm.running_var.uniform_(0.5, 2)
    data = train_split.subset(600, seed=1)
    reset_bn_statistics(model, data, num_examples=None, batch_size=200)

    means = [[] for _ in model.blocks]
    variances = [[] for _ in model.blocks]
    with torch.no_grad():
        for start in range(0, 600, 200):
            h = data.pixel_values[start : start + 200]
            for i, block in enumerate(model.blocks):
                z = block.conv(h)
                means[i].append(z.double().mean((0, 2, 3)))
                variances[i].append(z.double().var((0, 2, 3), unbiased=True))
                normed = F.batch_norm(
                    z, None, None, block.norm.weight, block.norm.bias, training=True, eps=block.norm.eps
                )
                h = block.pool(block.act(normed))
    for i, block in enumerate(model.blocks):
        # float32 sums over 200 x 28 x 28 positions, in whatever order the CPU's kernel takes (the portable one,
        # ATEN_CPU_CAPABILITY=default on one thread, was 3.5e-4 off): float32 rounding, not bit for bit. A wrong
        # rule (momentum 0.1 from the stale statistics, or the last batch alone) is off by far more.
        for running, batches in ((block.norm.running_mean, means[i]), (block.norm.running_var, variances[i])):
            torch.testing.assert_close(running.double(), torch.stack(batches).mean(0), atol=2e-3, rtol=2e-3)
        assert block.norm.momentum == 0.1 and not block.norm.training


def test_reset_bn_makes_batchnorm_outputs_standardised(train_split):
    """After the reset, each BN output has (about) mean beta and std gamma on the data."""
    a, b = pair(PermCNNForImageClassification, layers="8-avg-16", batch_norm=True)
    merged = averaged(a, b)
    data = train_split.subset(500, seed=2)
    reset_bn_statistics(merged, data, num_examples=None, batch_size=500)  # one batch: the exact statistics
    stats = unit_statistics(merged, ["blocks.0.norm"], data.pixel_values)["blocks.0.norm"]
    norm = merged.blocks[0].norm
    torch.testing.assert_close(stats.mean.float(), norm.bias.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(stats.std.float(), norm.weight.detach().abs(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_report_forward_passes_run_in_the_evaluation_precision(merger, tiny_fmnist, monkeypatch, precision):
    """evaluation.precision=tf32 turns TF32 matmuls on for the report's forward passes only (the CPU computes
    fp32 either way, so the numbers equal fp32's) and restores PyTorch's setting after."""
    from hf_permerge.config import config_from_dict
    from hf_permerge.reporting import report as report_module

    seen = []
    evaluate = report_module.evaluate_combinations

    def recording(*args, **kwargs):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(report_module, "evaluate_combinations", recording)
    settings = {"n_way": False, "num_lambdas": 3, "splits": ["test"]}
    splits = {"test": load_tensors("fashion_mnist", "test", data_dir=tiny_fmnist)}
    before = torch.backends.cuda.matmul.allow_tf32
    fp32 = report_module.build_report(
        merger, config_from_dict({"evaluation": settings}).evaluation, splits, progress=False
    )
    seen.clear()
    report = report_module.build_report(
        merger,
        config_from_dict({"evaluation": {**settings, "precision": precision}}).evaluation,
        splits,
        progress=False,
    )
    assert seen and all(flag == (precision == "tf32") for flag in seen)
    assert torch.backends.cuda.matmul.allow_tf32 == before
    assert report["precision"] == precision and fp32["precision"] == "fp32"
    assert report["curves"] == fp32["curves"] and report["barrier"] == fp32["barrier"]
