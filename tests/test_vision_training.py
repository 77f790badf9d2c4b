"""Any transformers image classifier (`model.type: transformers` on an image data set) is trained the way the paper's
nets are: seeded pairs by the PairTrainer, a pair folder that `PermMerger.from_pretrained` traces and merges."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from hf_permerge.config import ConfigError, apply_overrides, config_from_dict
from hf_permerge.training import PairTrainer, build_model, engines, model_config_for

TINY = {
    "resnet": {"embedding_size": 4, "hidden_sizes": [4, 8], "depths": [1, 1], "layer_type": "basic"},
    "vit": {
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
        "patch_size": 7,
    },
    "convnext": {"hidden_sizes": [4, 8], "depths": [1, 1], "num_stages": 2},
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets on 2 shared cores run several times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def base(model_type: str, data_dir=None) -> dict:
    return {
        "model": {"type": "transformers", "model_type": model_type, "config": dict(TINY[model_type])},
        "data": {"dataset": "fashion_mnist", **({"data_dir": str(data_dir)} if data_dir else {})},
        "training": {"num_nets": 2, "epochs": 1, "max_steps": 3, "batch_size": 50},
    }


def load(model_type: str, *overrides, data_dir=None):
    data = apply_overrides(copy.deepcopy(base(model_type, data_dir)), list(overrides))
    return config_from_dict(data, "vision.yaml", list(overrides))


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module", params=["resnet", "vit"])
def trained_pair(request, tmp_path_factory, tiny_fmnist):
    out = tmp_path_factory.mktemp(request.param) / "pair"
    PairTrainer(load(request.param, data_dir=tiny_fmnist), out, progress=False).train()
    return out


def test_pair_folder_holds_hf_image_classifiers_with_the_data_s_labels(trained_pair):
    for i in range(2):
        for checkpoint in ("init", "final"):
            folder = trained_pair / f"net_{i}" / checkpoint
            assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
        assert (trained_pair / f"net_{i}" / "log_history.json").is_file()
    assert (trained_pair / "pair.json").is_file()
    model = AutoModelForImageClassification.from_pretrained(trained_pair / "net_0" / "final")
    cfg = model.config
    assert (cfg.num_channels, cfg.num_labels, cfg.image_size) == (1, 10, 28)
    assert cfg.id2label[9] == "Ankle boot" and cfg.label2id["Trouser"] == 1
    assert list(cfg.image_mean) == pytest.approx([0.2860]) and list(cfg.image_std) == pytest.approx([0.3530])
    init_0, init_1 = weights(trained_pair / "net_0/init"), weights(trained_pair / "net_1/init")
    assert any(not torch.equal(init_0[k], init_1[k]) for k in init_0)  # each net its own seeded init
    assert any(not torch.equal(init_0[k], v) for k, v in weights(trained_pair / "net_0/final").items())


@pytest.mark.parametrize("matcher", ["weight", "activation"])
def test_a_trained_pair_merges_and_the_merge_loads(trained_pair, tmp_path, matcher):
    """Weight matching from the nets' folders, activation matching from the pair folder (on its data)."""
    from hf_permerge.merging import PermMerger

    folders = [trained_pair / "net_0" / "final", trained_pair / "net_1" / "final"]
    merger = PermMerger.from_pretrained(folders if matcher == "weight" else trained_pair)
    merger.align(matcher=matcher, checkpoint="final", **({"num_examples": 200} if matcher == "activation" else {}))
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    net_1, permuted = merger.load(1, "final").eval(), merger.permuted(1, "final").eval()
    with torch.no_grad():  # permuting a net's hidden units leaves its function alone (Appendix E)
        torch.testing.assert_close(permuted(pixel_values=x).logits, net_1(pixel_values=x).logits, atol=1e-5, rtol=1e-4)
    merger.save_pretrained(tmp_path / "merged", merger.merge(0.5, "final"))
    merged = AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert merged(pixel_values=x).logits.shape == (8, 10)


def test_evaluate_writes_a_report_of_curves_and_barriers(trained_pair, tmp_path, tiny_fmnist):
    from hf_permerge.reporting.pipeline import evaluate_pair

    overrides = [
        f"data.data_dir={tiny_fmnist}",
        "evaluation.num_lambdas=3",
        "evaluation.splits=[test]",
        "evaluation.plots=false",
        "evaluation.n_way=false",
        "alignment.num_examples=200",
    ]
    report = evaluate_pair(trained_pair, tmp_path / "eval", overrides=overrides, progress=False, device="cpu")
    assert (tmp_path / "eval" / "report.json").is_file()
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "eval" / "merged") is not None
    assert report["lambdas"] == [0.0, 0.5, 1.0]
    for checkpoint in ("final", "init"):
        for curve in ("vanilla", "permuted"):
            barrier = report["barrier"][checkpoint][curve]["test"]
            assert barrier["loss"] >= 0 and barrier["acc"] >= 0


@pytest.mark.parametrize(
    "model_type, multiplier, expected",
    [
        ("resnet", 2, {"embedding_size": 8, "hidden_sizes": [8, 16]}),
        ("vit", 2, {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}),
        ("convnext", 3, {"hidden_sizes": [12, 24]}),
        ("resnet", 0.5, {"embedding_size": 2, "hidden_sizes": [2, 4]}),
    ],
)
def test_width_multiplier_scales_the_widths_not_the_depths(model_type, multiplier, expected):
    hf = model_config_for(load(model_type, f"model.width_multiplier={multiplier}"))
    assert {k: getattr(hf, k) for k in expected} == expected
    assert hf.num_labels == 10 and hf.num_channels == 1


@pytest.mark.parametrize(
    "model_type, overrides, message",
    [
        ("resnet", ["model.config.num_labels=5"], r"model.config.num_labels is set from the data set"),
        ("vit", ["model.config.num_channels=3"], r"model.config.num_channels is set from the data set"),
        ("resnet", ["model.config.hidden_sizez=[4]"], r"model.config.hidden_sizez: not a key of resnet's config"),
        ("vit", ["model.width_multiplier=1.125"], r"model.width_multiplier: hidden_size 9 is not divisible by"),
        ("vit", ["model.config.hidden_size=9"], r"model.config.hidden_size: hidden_size 9 is not divisible by"),
        ("resnet", ["model.width_multiplier=0"], r"model.width_multiplier"),
        (
            "resnet",
            ["model.model_type=llama", "model.config={}"],
            r"data.dataset fashion_mnist is images, but model.type transformers",
        ),
        ("resnet", ["training.engine=stacked"], r"training.engine: stacked is for the MLP and CNN"),
        ("resnet", ["model.loss=mse"], r"model.loss mse: a transformers model trains with cross entropy"),
        ("resnet", ["model.model_type=resnt"], r"did you mean 'resnet'"),
    ],
)
def test_mistakes_are_refused_in_one_line_naming_the_key(model_type, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load(model_type, *overrides)
    assert len(str(err.value).splitlines()) == 2  # "invalid config ...:" and the one problem


def test_width_multiplier_is_refused_where_it_scales_nothing():
    with pytest.raises(ConfigError, match="model.width_multiplier is for type transformers, not cnn"):
        config_from_dict({"model": {"type": "cnn", "width_multiplier": 2}})
    with pytest.raises(ConfigError, match="model.width_multiplier: scales the widths of resnet, vit, convnext, not"):
        config_from_dict({"model": {"type": "transformers", "model_type": "deit", "width_multiplier": 2}, "data": {}})


def test_width_multiplier_is_a_sweep_grid_key():
    from hf_permerge.sweeps.config import sweep_config_from_dict

    sweep = sweep_config_from_dict(
        {
            **base("resnet"),
            "sweep": {"name": "w", "experiment": "pair", "grid": {"model.width_multiplier": [1, 2]}},
        }
    )
    assert [c.config.model.width_multiplier for c in sweep.cells] == [1, 2]
    assert model_config_for(sweep.cells[1].config).hidden_sizes == [8, 16]


def test_init_is_seeded_per_net_and_leaves_the_global_generator_alone():
    cfg = load("vit")
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a, b, other = build_model(cfg, 0).state_dict(), build_model(cfg, 0).state_dict(), build_model(cfg, 1).state_dict()
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], other[k]) for k in a)


def test_resume_of_a_batchnorm_resnet_equals_the_uninterrupted_run(tmp_path, tiny_fmnist, monkeypatch):
    """A ResNet killed mid-epoch and resumed ends where an uninterrupted run does, BatchNorm statistics included."""
    cfg = load(
        "resnet", "training.epochs=3", "training.max_steps=null", "training.batch_size=100", data_dir=tiny_fmnist
    )
    PairTrainer(cfg, tmp_path / "full", progress=False).train()

    calls = {"n": 0}
    real_step = engines.PerNetEngine.step

    def crashing_step(self, xs, ys):
        calls["n"] += 1
        if calls["n"] == 17:  # mid-way through epoch 2
            raise KeyboardInterrupt
        return real_step(self, xs, ys)

    monkeypatch.setattr(engines.PerNetEngine, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        PairTrainer(cfg, tmp_path / "cut", progress=False).train()
    monkeypatch.setattr(engines.PerNetEngine, "step", real_step)
    assert (tmp_path / "cut/net_0/resume-step-10").exists()
    PairTrainer(cfg, tmp_path / "cut", resume=True, progress=False).train()
    for i in range(2):
        full, cut = weights(tmp_path / f"full/net_{i}/final"), weights(tmp_path / f"cut/net_{i}/final")
        assert any("running_mean" in k for k in full) and full.keys() == cut.keys()
        for k in full:
            assert torch.equal(full[k], cut[k]), (i, k)


MEASURE = ["evaluation.num_lambdas=3", "evaluation.splits=[test]", "alignment.num_examples=200"]


def test_a_sweep_cell_measures_repair_and_bn_reset_side_by_side(trained_pair, tiny_fmnist):
    """evaluation.repair as a list: each correction's midpoint and the share of the permuted midpoint's barrier it
    removes, in the cell's numbers."""
    from hf_permerge.sweeps.experiments import measure

    if "resnet" not in str(trained_pair):
        pytest.skip("a BatchNorm reset needs BatchNorm")
    config = load("resnet", *MEASURE, "evaluation.repair=[repair, reset_bn]", data_dir=tiny_fmnist)
    m = measure("pair", config, trained_pair, "cpu")["metrics"]
    for mode in ("repair", "reset_bn"):
        for key in ("perm_acc", "vanilla_acc", "barrier_perm_acc", "barrier_perm_loss"):
            assert 0 <= m[f"{mode}_{key}"] or key.startswith("barrier")
        plain = m["single_acc"] - m["perm_acc"]
        if plain > 0:
            assert m[f"{mode}_removed_barrier_acc"] == pytest.approx(1 - m[f"{mode}_barrier_perm_acc"] / plain)
            assert m[f"{mode}_barrier_perm_acc"] == pytest.approx(m["single_acc"] - m[f"{mode}_perm_acc"])


def test_heads_kept_never_moves_a_head_and_keeps_the_function(trained_pair, tiny_fmnist):
    """heads="keep": every coupled group's permutation maps each head onto itself; the permuted net computes the
    same function; the `matchers` experiment compares moved and kept in one cell."""
    from hf_permerge.merging import PermMerger
    from hf_permerge.sweeps.experiments import measure

    if "vit" not in str(trained_pair):
        pytest.skip("heads are ViT's")
    merger = PermMerger.from_pretrained(trained_pair)
    spec = merger.spec
    assert spec.couplings
    perms = merger.align(matcher="weight", heads="keep")[1]
    for name in {n for c in spec.couplings for n in c}:
        width = spec[name].size // spec[name].blocks
        heads = perms[name] // width
        assert torch.equal(heads, torch.arange(spec[name].size) // width), name
    assert merger.alignment["heads"] == "keep"
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            merger.permuted(1).eval()(pixel_values=x).logits,
            merger.load(1).eval()(pixel_values=x).logits,
            atol=1e-5,
            rtol=1e-4,
        )
    assert merger.load(0).permutation_spec() == spec  # the full spec is back after aligning
    config = load("vit", *MEASURE, data_dir=tiny_fmnist)
    m = measure("matchers", config, trained_pair, "cpu", matchers={"moved": {}, "kept": {"heads": "keep"}})
    assert {"moved:perm_acc", "kept:perm_acc", "random_acc"} <= set(m["metrics"])


def test_heads_kept_recovers_a_planted_permutation_within_heads(trained_pair, tmp_path):
    """B = A with units permuted within each head (heads in place) and every other group permuted: weight matching
    with heads kept lines B up with A again, so their merge computes A's function."""
    import dataclasses

    from hf_permerge.alignment import Permutations
    from hf_permerge.merging import PermMerger

    if "vit" not in str(trained_pair):
        pytest.skip("heads are ViT's")
    a = PermMerger.from_pretrained(trained_pair).load(0)
    spec = a.permutation_spec()
    planted = Permutations.random(dataclasses.replace(spec, couplings=()), seed=3)
    a.save_pretrained(tmp_path / "a")
    planted.apply(a, spec).save_pretrained(tmp_path / "b")
    merger = PermMerger.from_pretrained([tmp_path / "a", tmp_path / "b"])
    merger.align(matcher="weight", heads="keep")
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            merger.merge(0.5).eval()(pixel_values=x).logits, a.eval()(pixel_values=x).logits, atol=1e-4, rtol=1e-4
        )
