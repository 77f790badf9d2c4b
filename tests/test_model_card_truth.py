"""The model card and merge_config.json say what was merged: which nets, which weights, whether permuted."""

import json
import signal

import pytest
from huggingface_hub import ModelCard

from hf_permerge import cli
from hf_permerge.data import load_tensors
from hf_permerge.merging import PermMerger
from hf_permerge.merging.model_card import render_model_card


@pytest.fixture
def merger(tiny_pair):
    return PermMerger.from_pretrained(tiny_pair)


@pytest.fixture
def aligned(merger, tiny_fmnist):
    merger.align(load_tensors("fashion_mnist", "train", data_dir=tiny_fmnist), num_examples=1000)
    return merger


def saved(merger, folder):
    merger.save_pretrained(folder)
    return ModelCard.load(folder / "README.md"), json.loads((folder / "merge_config.json").read_text())


def test_vanilla_merge_card_claims_no_permutation(merger, tmp_path):
    merger.align(matcher="weight")  # found, but a vanilla average does not use them
    merger.merge(0.5, permute=False)
    card, config = saved(merger, tmp_path / "out")
    assert "permutation-alignment" not in card.data.tags
    assert "permutation-aligned" not in card.text and "were permuted to line up" not in card.text
    assert "vanilla weight average" in card.text and "alignment: none" in card.text
    assert "matcher" not in card.text and "permutations are saved" not in card.text
    assert not (tmp_path / "out" / "permutations").exists()
    assert config["merge"]["permuted"] is False and config["alignment"] is None


def test_permuted_merge_card_says_permuted_and_saves_the_permutations(aligned, tmp_path):
    aligned.merge(0.3)
    card, config = saved(aligned, tmp_path / "out")
    assert "permutation-alignment" in card.data.tags and "permutation-aligned merge" in card.text
    assert "alpha (λ): 0.3 (0.7 × first model + 0.3 × second, permuted)" in card.text
    assert "permutations found on the `final` weights" in card.text
    assert (tmp_path / "out" / "permutations" / "net_1.safetensors").is_file()
    assert config["merge"]["permuted"] is True


def test_uniform_merge_of_three_nets_card_says_uniform_not_alpha(aligned, tmp_path):
    aligned.merge_all()
    card, config = saved(aligned, tmp_path / "out")
    assert config["merge"]["alpha"] is None and config["merge"]["nets"] == [0, 1, 2]
    assert "uniform average of all 3 models (1/3 each)" in card.text
    assert "alpha" not in card.text
    assert card.data.merged_from == ["net_0", "net_1", "net_2"]


def test_pair_merge_of_a_three_net_pair_lists_only_the_two_merged_nets(aligned, tmp_path):
    aligned.merge(0.5, other=2)
    card, _ = saved(aligned, tmp_path / "out")
    assert card.data.merged_from == ["net_0", "net_2"]
    assert "of 2 independently trained models" in card.text


def test_init_merge_card_does_not_call_the_inits_trained(aligned, tmp_path):
    aligned.merge(0.5, checkpoint="init")
    card, _ = saved(aligned, tmp_path / "out")
    assert "trained models" not in card.text
    assert "2 untrained initialisations (the `init` checkpoints)" in card.text


def test_card_and_merge_config_hold_no_local_absolute_path(tiny_pair, tmp_path):
    for source in (tiny_pair, [tiny_pair / "net_0" / "final", tiny_pair / "net_1" / "final"]):
        merger = PermMerger.from_pretrained(source)
        merger.align(matcher="weight")
        merger.merge(0.5)
        out = tmp_path / f"out{isinstance(source, list)}"
        merger.save_pretrained(out, command=f"hf-permerge merge {tiny_pair} -o {out} --vanilla")
        for name in ("README.md", "merge_config.json"):
            text = (out / name).read_text()
            assert str(tmp_path) not in text and str(tiny_pair.parent) not in text, name
    card = ModelCard.load(tmp_path / "outTrue" / "README.md")
    assert card.data.merged_from == ["net_0/final", "net_1/final"]
    assert "hf-permerge merge tiny_pair -o outTrue --vanilla" in card.text


def test_card_endpoint_rows_name_the_nets_portably():
    report = {
        "endpoints": [{"net": i, "test": {"acc": 0.8 + i / 100, "loss": 0.5}} for i in range(3)],
        "curves": {
            "final": {"permuted": {"lambdas": [0, 0.5, 1], "test": {"acc": [0.8, 0.7, 0.81], "loss": [0.5, 0.9, 0.5]}}}
        },
    }
    card = render_model_card(
        {
            "base_models": [
                {"name": "/home/me/runs/pair/net_0", "hub": False},
                {"name": "/home/me/runs/pair/net_1", "hub": False},
            ],
            "nets": [0, 1],
            "alpha": 0.5,
            "report": report,
        }
    )
    text = str(card)
    assert "/home/me" not in text
    assert "| endpoint: net_0 | 0.8000 |" in text and "| endpoint: net_1 | 0.8100 |" in text
    assert "endpoint: net_2" not in text  # not part of this merge


def test_card_reports_the_vanilla_number_for_a_vanilla_merge():
    curve = {"lambdas": [0, 0.5, 1]}
    report = {
        "curves": {
            "final": {
                "vanilla": {**curve, "test": {"acc": [0.8, 0.4, 0.8], "loss": [0.5, 1.7, 0.5]}},
                "permuted": {**curve, "test": {"acc": [0.8, 0.7, 0.8], "loss": [0.5, 0.9, 0.5]}},
            }
        }
    }
    text = str(render_model_card({"base_models": ["a/x", "a/y"], "permuted": False, "report": report}))
    assert "| **this merged model** | 0.4000 | 1.7000 |" in text


def test_hub_pair_nets_link_to_their_repo_once():
    card = ModelCard(
        str(
            render_model_card(
                {"base_models": [{"name": f"alice/pair/net_{i}", "hub": True, "repo": "alice/pair"} for i in (0, 1)]}
            )
        )
    )
    assert card.data.base_model == ["alice/pair"]
    assert card.data.merged_from == ["alice/pair/net_0", "alice/pair/net_1"]
    assert "(https://huggingface.co/alice/pair)" in card.text


def test_portable_names_drop_the_local_folders():
    from hf_permerge.merging.model_card import portable_command
    from hf_permerge.merging.sources import portable_path

    assert portable_path("/tmp/audit/demo/pair/net_0") == "net_0"
    assert portable_path("/tmp/audit/demo/pair/net_1/final") == "net_1/final"
    assert portable_path("runs/pair/net_1/final") == "runs/pair/net_1/final"
    assert (
        portable_command("hf-permerge run c.yaml -o /tmp/a/demo --output-dir=/tmp/b/x --set a.b=1")
        == "hf-permerge run c.yaml -o demo --output-dir=x --set a.b=1"
    )


@pytest.mark.parametrize(
    "matcher, expected",
    [
        ("weight", {"max_iter": 100, "seed": 0, "bottom_up": True}),
        ("activation", {"similarity": "cosine", "preactivation": False, "num_examples": 1000}),
    ],
)
def test_merge_config_records_the_matcher_settings_used(merger, tmp_path, tiny_fmnist, matcher, expected):
    data = load_tensors("fashion_mnist", "train", data_dir=tiny_fmnist)
    merger.align(
        data if matcher == "activation" else None,
        matcher=matcher,
        **({"num_examples": 1000} if matcher == "activation" else {}),
    )
    merger.merge(0.5)
    _, config = saved(merger, tmp_path / "out")
    assert expected.items() <= config["alignment"]["settings"].items()


def test_cli_merge_card_has_a_reproduce_command(tiny_pair, tmp_path, monkeypatch):
    args = ["merge", str(tiny_pair), "--vanilla", "--alpha", "0.25", "-o", str(tmp_path / "out")]
    monkeypatch.setattr("sys.argv", ["hf-permerge", *args])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(args) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)
    text = (tmp_path / "out" / "README.md").read_text()
    assert "hf-permerge merge tiny_pair --vanilla --alpha 0.25 -o out" in text
    assert str(tmp_path) not in text


def test_bare_model_folders_card_does_not_claim_their_training_data(tiny_pair, tiny_fmnist, tmp_path):
    """Models without a pair.json came from elsewhere: the data the merge used is named as that, not as what the
    models were trained on, and stays out of the `datasets` metadata (training data on the Hub)."""
    merger = PermMerger.from_pretrained([tiny_pair / "net_0" / "final", tiny_pair / "net_1" / "final"])
    merger.use_data("fashion_mnist", data_dir=tiny_fmnist)
    merger.align(num_examples=200)
    merger.merge(0.5)
    card, config = saved(merger, tmp_path / "out")
    assert "merged with data from Fashion-MNIST; the models' own training data is not recorded" in card.text
    assert not card.data.datasets and config["dataset"] == "fashion_mnist"
    assert config["alignment"]["data"] == "fashion_mnist training split" and config["alignment"]["examples"] == 200

    pair = PermMerger.from_pretrained(tiny_pair)
    pair.align(matcher="weight")
    pair_card, _ = saved(pair, tmp_path / "pair_out")
    assert "on Fashion-MNIST, made with" in pair_card.text and pair_card.data.datasets == [
        "zalando-datasets/fashion_mnist"
    ]


def test_weight_matching_starts_from_app_d_unless_told_otherwise(tiny_pair, tmp_path, run_cli):
    """The default weight matcher descends from App. D's pass; --no-bottom-up is Git Re-Basin's identity start."""
    for flag, expected in (((), True), (("--no-bottom-up",), False), (("--bottom-up",), True)):
        out = tmp_path / f"out{len(flag)}{expected}"
        assert run_cli("merge", tiny_pair, "--matcher", "weight", *flag, "-q", "-o", out) == 0
        assert json.loads((out / "merge_config.json").read_text())["alignment"]["settings"]["bottom_up"] is expected
