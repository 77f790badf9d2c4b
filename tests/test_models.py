"""The model classes: seeded init, HF round trips, specs that fit, losses."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageClassification

import hf_permerge
from hf_permerge.models import (
    PermCNNConfig,
    PermCNNForImageClassification,
    PermMLPConfig,
    PermMLPForImageClassification,
)
from hf_permerge.models.configuration_perm_cnn import parse_layers


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "make",
    [
        lambda s: PermMLPForImageClassification(PermMLPConfig(depth=2, width=16, seed=s)),
        lambda s: PermCNNForImageClassification(PermCNNConfig(layers="4-avg-8", batch_norm=True, seed=s)),
    ],
)
def test_seed_fixes_init_bit_identically(make):
    assert same_weights(make(7), make(7))
    assert not same_weights(make(7), make(8))


def test_kaiming_init_has_relu_fan_in_std_on_every_layer():
    m = PermMLPForImageClassification(PermMLPConfig(depth=2, width=512, seed=0))
    for layer in [*m.layers, m.classifier]:
        fan_in = layer.weight.shape[1]
        assert abs(layer.weight.std().item() - (2 / fan_in) ** 0.5) < 0.05 * (2 / fan_in) ** 0.5
    assert m.layers[0].bias is None  # bias off by default, as in the authors' code


@pytest.mark.parametrize("init", ["xavier", "orthogonal"])
def test_other_inits_differ_from_kaiming(init):
    a = PermMLPForImageClassification(PermMLPConfig(depth=1, width=64, seed=0))
    b = PermMLPForImageClassification(PermMLPConfig(depth=1, width=64, seed=0, init=init))
    assert not same_weights(a, b)
    if init == "orthogonal":
        w = b.layers[0].weight  # 64 x 784: orthonormal rows times the ReLU gain
        assert torch.allclose(w @ w.T, 2 * torch.eye(64), atol=1e-4)


@pytest.mark.parametrize(
    "model",
    [
        PermMLPForImageClassification(PermMLPConfig(depth=2, width=16, seed=1)),
        PermCNNForImageClassification(PermCNNConfig(layers="4-4-avg-8", seed=1, batch_norm=True)),
    ],
)
def test_automodel_round_trip_is_bit_identical(tmp_path, model):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    assert AutoConfig.from_pretrained(tmp_path).model_type == model.config.model_type
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and same_weights(loaded, model)


def test_outputs_follow_transformers_conventions():
    m = PermCNNForImageClassification(PermCNNConfig(layers="4-avg-8", seed=0))
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 1, 2])
    out = m(pixel_values=x, labels=y)
    assert out.logits.shape == (3, 10) and out.loss.ndim == 0
    assert m(pixel_values=x).loss is None


def test_mse_loss_is_on_one_hot_targets():
    m = PermMLPForImageClassification(PermMLPConfig(depth=1, width=8, loss="mse"))
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    out = m(pixel_values=x, labels=y)
    expected = ((out.logits - torch.nn.functional.one_hot(y, 10).float()) ** 2).mean()
    assert torch.allclose(out.loss, expected)


@pytest.mark.parametrize(
    "layers,expected",
    [("64-64-avg-128-128", [64, 64, "avg", 128, 128]), ("32-avg-64-avg-128", [32, "avg", 64, "avg", 128])],
)
def test_layer_strings_parse_as_the_paper_writes_them(layers, expected):
    assert parse_layers(layers) == expected


@pytest.mark.parametrize("bad", ["64-avg-x", "avg-64", "64-avg-avg-8", "", "64--64"])
def test_bad_layer_strings_are_refused_with_the_token(bad):
    with pytest.raises(ValueError, match="layers"):
        PermCNNConfig(layers=bad)


def test_spec_fits_state_dict_and_names_activation_modules():
    for model in [
        PermMLPForImageClassification(PermMLPConfig(depth=3, width=8, bias=True)),
        PermCNNForImageClassification(PermCNNConfig(layers="4-4-avg-8", batch_norm=True)),
    ]:
        spec = model.permutation_spec()
        spec.validate(model.state_dict())
        modules = dict(model.named_modules())
        for g in spec.groups:
            assert g.activation in modules and g.preactivation in modules


def test_cnn_last_activation_is_after_global_pool():
    m = PermCNNForImageClassification(PermCNNConfig(layers="4-avg-8"))
    seen = {}
    last = m.permutation_spec().groups[-1]
    dict(m.named_modules())[last.activation].register_forward_hook(lambda mod, i, o: seen.setdefault("a", o))
    m(pixel_values=torch.randn(2, 1, 28, 28))
    assert seen["a"].shape == (2, 8)


def test_config_records_normalisation_and_import_registers_auto_classes():
    assert hf_permerge.PermMLPConfig().image_mean == [0.2860]
    assert AutoConfig.for_model("perm_cnn").model_type == "perm_cnn"


def test_batchnorm_statistics_survive_a_save_load_round_trip(tmp_path):
    m = PermCNNForImageClassification(PermCNNConfig(layers="4-avg-8", batch_norm=True, seed=0))
    m.train()
    with torch.no_grad():
        m(pixel_values=torch.randn(16, 1, 28, 28) * 3 + 1)  # running stats move away from 0 / 1
    m.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    for name, buf in m.named_buffers():
        assert torch.equal(buf, dict(loaded.named_buffers())[name]), name
