"""What a new user meets on the text path: what does not apply to a language model is refused by name in one line,
help speaks of any model, and `evaluate` shows its progress, counts the tokens it predicts and puts its numbers in
the merged model's card."""

from __future__ import annotations

import json
import os

import pytest
from bad_inputs import save_pair
from test_bad_input_text import assert_one_line

from hf_permerge import PermMerger
from hf_permerge.cli import build_parser


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"))


def test_the_gradient_matcher_on_language_models_is_refused_in_one_line(pair, tmp_path, run_cli, capsys):
    capsys.readouterr()
    assert run_cli("merge", pair["a"], pair["b"], "--matcher", "gradient", "-q", "-o", tmp_path / "out") == 2
    assert_one_line(capsys.readouterr().err, "the gradient matcher (Appendix B) follows a classifier's loss")
    with pytest.raises(ValueError, match="align them with the weight or the activation matcher"):
        PermMerger.from_pretrained([pair["a"], pair["b"]]).align(matcher="gradient")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["repair", "reset_bn"])
def test_repair_on_a_layernorm_transformer_says_once_what_it_admits(pair, tmp_path, run_cli, capsys, mode):
    capsys.readouterr()
    out = tmp_path / "out"
    assert run_cli("merge", pair["a"], pair["b"], "--matcher", "weight", "--repair", mode, "-q", "-o", out) == 2
    line = assert_one_line(capsys.readouterr().err, "is a LayerNorm transformer, which admits neither repair")
    assert "use REPAIR instead" not in line and not out.exists()


def test_merge_help_speaks_of_any_model():
    merge = build_parser()._subparsers._group_actions[0].choices["merge"]
    text = " ".join(merge.format_help().split())
    assert "AutoModelForCausalLM" in text and "examples to use (images or text sequences)" in text
    assert "on 5000 examples of the data" in text and "5000 images" not in text


def test_a_mistyped_local_folder_is_named_as_a_missing_folder(pair, run_cli, capsys, monkeypatch):
    monkeypatch.chdir(pair["a"].parent)
    capsys.readouterr()
    assert run_cli("merge", "a", "bx", "--matcher", "weight", "-q", "-o", "out") == 2
    assert assert_one_line(capsys.readouterr().err, "there is no folder bx (. holds: a, as, b, bs)")


def test_evaluate_refuses_a_setting_it_does_not_read_by_name(pair, tmp_path, run_cli, capsys):
    text = tmp_path / "heldout.txt"
    text.write_text("\n".join(" ".join(f"w{(5 * i + 3 * j) % 90}" for j in range(10)) for i in range(12)))
    capsys.readouterr()
    out = tmp_path / "eval"
    assert (
        run_cli("evaluate", pair["a"], pair["b"], "--dataset", text, "--set", "evaluation.plane=true", "-o", out) == 2
    )
    assert_one_line(capsys.readouterr().err, "--set evaluation.plane: the evaluation of language models")
    assert not out.exists()


def test_evaluate_logs_each_lambda_counts_predicted_tokens_and_fills_the_card(pair, tmp_path, run_cli, capsys):
    text = tmp_path / "heldout.txt"
    text.write_text("\n".join(" ".join(f"w{(5 * i + 3 * j) % 90}" for j in range(10)) for i in range(12)))
    out = tmp_path / "eval"
    capsys.readouterr()
    assert (
        run_cli("evaluate", pair["a"], pair["b"], "--dataset", text, "--set", "evaluation.num_lambdas=3", "-o", out)
        == 0
    )
    captured = capsys.readouterr()
    steps = [line for line in captured.err.splitlines() if line.startswith("text curves ")]
    assert len(steps) == 2 * 3 and steps[-1].startswith("text curves 6/6: final heldout permuted λ=1.00 loss")
    report = json.loads((out / "report.json").read_text())
    assert report["tokens"]["heldout"] == 12 * 10 and report["predicted_tokens"]["heldout"] == 12 * 9
    assert set(report["config"]["evaluation"]) == {"num_lambdas", "plots"}
    assert "(108 tokens predicted)" in captured.out
    card = (out / "merged" / "README.md").read_text()
    loss = report["curves"]["final"]["heldout"]["permuted"]["loss"][1]
    assert "## Held-out loss along λ (final weights, heldout: 108 tokens predicted)" in card
    assert f"| 0.5 | {report['curves']['final']['heldout']['vanilla']['loss'][1]:.4f} |" in card
    assert f"{loss:.4f}" in card and os.path.isfile(out / "merged" / "report.json")


def test_evaluate_aligns_by_activations_on_other_text_than_it_measures(pair, tmp_path, run_cli, capsys):
    heldout, other = tmp_path / "heldout.txt", tmp_path / "align.txt"
    heldout.write_text("\n".join(" ".join(f"w{(5 * i + 3 * j) % 90}" for j in range(10)) for i in range(12)))
    other.write_text("\n".join(" ".join(f"w{(7 * i + j) % 90}" for j in range(12)) for i in range(30)))
    out, flags = tmp_path / "eval", ["--set", "alignment.matcher=activation", "--set", "evaluation.num_lambdas=3", "-q"]
    capsys.readouterr()
    assert (
        run_cli("evaluate", pair["a"], pair["b"], "--dataset", heldout, "--align-dataset", heldout, *flags, "-o", out)
        == 2
    )
    assert_one_line(capsys.readouterr().err, "--align-dataset is the held-out --dataset")
    assert (
        run_cli("evaluate", pair["a"], pair["b"], "--dataset", heldout, "--align-dataset", other, *flags, "-o", out)
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["alignment"]["matcher"] == "activation"
    curve = report["curves"]["final"]["heldout"]["permuted"]["loss"]
    assert max(curve) - min(curve) < 1e-4  # B is a planted permutation of A: aligned, one function all along
