"""Interpolation curves and the plane: the batched pass gives the numbers of evaluating each network alone."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from hf_permerge import PermCNNConfig, PermCNNForImageClassification, PermMLPConfig, PermMLPForImageClassification
from hf_permerge.data.tensors import load_tensors
from hf_permerge.evaluation import (
    combine_state_dicts,
    default_lambdas,
    evaluate_combinations,
    evaluate_curve,
    evaluate_model,
    evaluate_plane,
    interpolate_state_dicts,
    plane_coefficients,
    plane_coordinates,
    tempered_nll,
)

METRICS = ("loss", "acc", "nll", "nll_tempered")


@pytest.fixture(scope="module")
def test_split():
    return load_tensors("fashion_mnist", "test").subset(2000, seed=0)


@pytest.fixture(scope="module")
def small_split(test_split):
    return test_split.subset(500, seed=1)


def randomise_bn_stats(net, seed):
    """Give BN nets non-trivial running statistics, so interpolating them is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.3 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
    return net


class MLPThroughVmap(PermMLPForImageClassification):
    """Same model, but not the exact class: takes the generic vmap path instead of the MLP fast path."""


def make_pair(kind):
    if kind.startswith("mlp"):
        cfg = dict(depth=2, width=32, bias=kind == "mlp_bias", loss="mse" if kind == "mlp_mse" else "cross_entropy")
        cls = MLPThroughVmap if kind == "mlp_vmap" else PermMLPForImageClassification
        return [cls(PermMLPConfig(seed=s, **cfg)) for s in (0, 1)]
    cfg = PermCNNConfig(layers="8-avg-16", batch_norm=kind == "cnn_bn")
    return [
        randomise_bn_stats(PermCNNForImageClassification(PermCNNConfig(**{**cfg.to_dict(), "seed": s})), s)
        for s in (0, 1)
    ]


def assert_close(batched: dict, single: dict, n_examples: int):
    assert batched["loss"] == pytest.approx(single["loss"], rel=1e-4, abs=1e-5)
    assert batched["nll"] == pytest.approx(single["nll"], rel=1e-4, abs=1e-5)
    assert batched["nll_tempered"] == pytest.approx(single["nll_tempered"], rel=1e-4, abs=1e-5)
    assert abs(batched["acc"] - single["acc"]) <= 1.0 / n_examples + 1e-9  # at most one rounding-flipped argmax


@pytest.mark.parametrize("kind", ["mlp", "mlp_bias", "mlp_mse", "mlp_vmap", "cnn", "cnn_bn"])
def test_batched_curve_equals_per_lambda_loop(kind, test_split, small_split):
    split = small_split if kind.startswith("cnn") else test_split
    a, b = make_pair(kind)
    lams = [0.0, 0.3, 0.5, 1.0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        curve = evaluate_curve(a, a, b, lams, {"test": split}, batch_size=300)["test"]
    assert not [w for w in caught if "vmap" in str(w.message)], "vmap must run our models without the fallback"
    probe = make_pair(kind)[0]
    for i, lam in enumerate(lams):
        probe.load_state_dict(interpolate_state_dicts(a.state_dict(), b.state_dict(), lam))
        assert_close({k: curve[k][i] for k in METRICS}, evaluate_model(probe, split), len(split))
    if kind == "mlp_mse":  # `loss` is the model's own objective, `nll` the cross-entropy
        assert curve["loss"][0] != pytest.approx(curve["nll"][0], rel=1e-2)


def test_curve_endpoints_equal_evaluate_model_of_each_net(test_split):
    a, b = make_pair("mlp")
    curve = evaluate_curve(a, a.state_dict(), b.state_dict(), default_lambdas(), {"test": test_split})["test"]
    assert len(curve["acc"]) == 11
    assert_close({k: curve[k][0] for k in METRICS}, evaluate_model(a, test_split), len(test_split))
    assert_close({k: curve[k][-1] for k in METRICS}, evaluate_model(b, test_split), len(test_split))


def test_vmap_the_loop_over_sets_and_the_fallback_give_the_same_numbers(small_split, monkeypatch):
    """Conv nets on the CPU loop over the parameter sets (grouped convolutions are slow there); vmap, where it
    is taken, and the fallback when vmap cannot run the model, give the same numbers."""
    from hf_permerge.evaluation import interpolation

    a, b = make_pair("cnn")
    assert not interpolation._vmap_pays(a, {"test": small_split})
    looped = evaluate_curve(a, a, b, [0.0, 0.5, 1.0], {"test": small_split})["test"]
    monkeypatch.setattr(interpolation, "_vmap_pays", lambda model, splits: True)
    vmapped = evaluate_curve(a, a, b, [0.0, 0.5, 1.0], {"test": small_split})["test"]

    def broken_vmap(*args, **kwargs):
        raise RuntimeError("no batching rule")

    monkeypatch.setattr(torch, "vmap", broken_vmap)
    with pytest.warns(UserWarning, match="one by one"):
        fallback = evaluate_curve(a, a, b, [0.0, 0.5, 1.0], {"test": small_split})["test"]
    for k in METRICS:
        assert vmapped[k] == pytest.approx(looped[k], rel=1e-5, abs=1e-6)
        assert fallback[k] == pytest.approx(looped[k], rel=1e-5, abs=1e-6)


def test_tempered_nll_is_at_most_nll_and_is_the_grid_minimum():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (3000,), generator=g)
    logits = torch.randn(4, 3000, 10, generator=g) * torch.tensor([0.2, 1.0, 4.0, 12.0])[:, None, None]
    logits[:, torch.arange(3000), labels] += torch.tensor([0.0, 1.0, 3.0, 8.0])[:, None]  # from poor to overconfident
    nll_t, temperature = tempered_nll(logits, labels)
    temps = torch.logspace(-2, 3, 501, dtype=torch.float64)
    for p in range(4):
        nll_1 = F.cross_entropy(logits[p], labels)
        scaled = logits[p].double()[None] / temps[:, None, None]
        grid = (torch.logsumexp(scaled, -1) - scaled[:, torch.arange(3000), labels]).mean(-1)
        assert nll_t[p] <= nll_1 + 1e-6
        assert grid.min().item() - 1e-3 <= nll_t[p] <= grid.min().item() + 1e-6
        assert F.cross_entropy(logits[p] / temperature[p], labels) == pytest.approx(nll_t[p].item(), abs=1e-5)


def test_tempered_nll_of_a_useless_net_is_log_of_the_class_count():
    labels = torch.arange(10).repeat(50)
    logits = -5.0 * F.one_hot(labels, 10).float()[None]  # confidently wrong everywhere
    nll_t, temperature = tempered_nll(logits, labels)
    assert nll_t[0] == pytest.approx(torch.log(torch.tensor(10.0)).item(), abs=1e-3)
    assert temperature[0] == float("inf")


def test_interpolate_state_dicts_endpoints_and_midpoint():
    a, b = make_pair("cnn_bn")
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in interpolate_state_dicts(sa, sb, 0.0).items():
        assert torch.equal(v, sa[k])
    mid = interpolate_state_dicts(sa, sb, 0.5)
    w = "blocks.0.conv.weight"
    assert torch.allclose(mid[w], (sa[w] + sb[w]) / 2)
    assert torch.allclose(
        mid["blocks.0.norm.running_var"], (sa["blocks.0.norm.running_var"] + sb["blocks.0.norm.running_var"]) / 2
    )
    assert mid["blocks.0.norm.num_batches_tracked"].dtype == torch.int64
    assert torch.allclose(interpolate_state_dicts(sa, sb, 1.0)[w], sb[w])


def test_mismatched_architectures_raise_a_clear_error(small_split):
    a = PermMLPForImageClassification(PermMLPConfig(depth=2, width=32))
    wider = PermMLPForImageClassification(PermMLPConfig(depth=2, width=64))
    with pytest.raises(ValueError, match="same architecture"):
        interpolate_state_dicts(a.state_dict(), wider.state_dict(), 0.5)
    with pytest.raises(ValueError, match="same architecture"):
        evaluate_curve(a, a, wider, [0.0, 1.0], {"test": small_split})


def test_default_lambdas_have_exact_endpoints_and_midpoint():
    lams = default_lambdas()
    assert len(lams) == 11 and lams[0] == 0.0 and lams[-1] == 1.0 and lams[5] == 0.5
    with pytest.raises(ValueError):
        default_lambdas(1)


def test_plane_basis_is_orthonormal_and_reproduces_the_three_nets():
    t0, t1 = make_pair("mlp_bias")
    t2 = PermMLPForImageClassification(PermMLPConfig(depth=2, width=32, bias=True, seed=2))
    bases = [t.state_dict() for t in (t0, t1, t2)]
    points = plane_coordinates(*bases)
    assert points["theta_0"] == (0.0, 0.0) and points["theta_1"][1] == 0.0 and points["pi_theta_1"][1] > 0
    uv = torch.tensor(
        [points["theta_1"], points["pi_theta_1"], (0.0, 0.0), (1.0, 0.0), (0.0, 1.0)], dtype=torch.float64
    )
    combos = combine_state_dicts(bases, plane_coefficients(uv, points))
    flat = torch.cat([v.reshape(len(uv), -1) for v in combos.values()], dim=1).double()
    for row, sd in zip(flat[:3], (bases[1], bases[2], bases[0])):
        assert torch.allclose(row, torch.cat([v.reshape(-1) for v in sd.values()]).double(), atol=1e-5)
    e1, e2 = flat[3] - flat[2], flat[4] - flat[2]
    assert e1.norm().item() == pytest.approx(1.0, rel=1e-4)
    assert e2.norm().item() == pytest.approx(1.0, rel=1e-4)
    assert (e1 @ e2).item() == pytest.approx(0.0, abs=1e-4)


def test_plane_grid_matches_evaluating_each_grid_network(small_split):
    t0, t1 = make_pair("mlp")
    t2 = PermMLPForImageClassification(PermMLPConfig(depth=2, width=32, seed=2))
    plane = evaluate_plane(t0, t0, t1, t2, {"test": small_split}, resolution=3, margin=0.1)
    assert len(plane["u"]) == 3 and len(plane["test"]["acc"]) == 3 and len(plane["test"]["acc"][0]) == 3
    us, vs = [p[0] for p in plane["points"].values()], [p[1] for p in plane["points"].values()]
    assert plane["u"][0] < min(us) and plane["u"][-1] > max(us) and plane["v"][0] < 0 < max(vs) < plane["v"][-1]
    probe = PermMLPForImageClassification(PermMLPConfig(depth=2, width=32))
    for j, i in ((0, 0), (1, 2), (2, 1)):
        coeffs = plane_coefficients(torch.tensor([[plane["u"][i], plane["v"][j]]]), plane["points"])
        probe.load_state_dict(
            {k: v[0] for k, v in combine_state_dicts([t.state_dict() for t in (t0, t1, t2)], coeffs).items()}
        )
        single = evaluate_model(probe, small_split)
        assert_close({k: plane["test"][k][j][i] for k in METRICS}, single, len(small_split))


def test_plane_anchors_are_the_three_nets_own_accuracies(small_split):
    """The map's three anchors (theta_0, theta_1, pi(theta_1)) are evaluated exactly: each equals the net itself."""
    t0, t1 = make_pair("mlp")
    t2 = PermMLPForImageClassification(PermMLPConfig(depth=2, width=32, seed=2))
    plane = evaluate_plane(t0, t0, t1, t2, {"test": small_split}, resolution=3, margin=0.1)
    for name, net in zip(("theta_0", "theta_1", "pi_theta_1"), (t0, t1, t2)):
        assert_close(plane["at_points"][name]["test"], evaluate_model(net, small_split), len(small_split))


def test_plane_of_collinear_nets_raises(small_split):
    t0, t1 = make_pair("mlp")
    with pytest.raises(ValueError, match="identity"):
        evaluate_plane(t0, t0, t1, t1, {"test": small_split}, resolution=3)


def test_n_way_style_combinations_weight_each_net(test_split):
    """Rows of coefficients are arbitrary: the uniform average of three nets equals loading that average."""
    nets = make_pair("mlp") + [PermMLPForImageClassification(PermMLPConfig(depth=2, width=32, seed=2))]
    coeffs = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    res = evaluate_combinations(nets[0], nets, coeffs, {"test": test_split})["test"]
    probe = PermMLPForImageClassification(PermMLPConfig(depth=2, width=32))
    probe.load_state_dict({k: sum(n.state_dict()[k] for n in nets) / 3 for k in nets[0].state_dict()})
    assert_close({k: res[k][1] for k in METRICS}, evaluate_model(probe, test_split), len(test_split))
