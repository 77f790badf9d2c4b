"""The command line on text models: merge by weight matching, activation matching on a text file, and
`align --write-aligned`, whose output is an ordinary model folder with the same function as the model it came from."""

import json

import pytest
import torch
from test_text_merging import _pair
from text_models import logits, token_ids
from transformers import AutoModelForCausalLM


def test_merge_text_models_by_weight_matching_on_the_command_line(tmp_path, run_cli):
    a, b = _pair(tmp_path, "llama")
    assert run_cli("merge", a, b, "--matcher", "weight", "-q", "-o", tmp_path / "merged") == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    reference = AutoModelForCausalLM.from_pretrained(a)
    assert torch.allclose(logits(merged, token_ids()), logits(reference, token_ids()), atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_activation_matching_on_a_text_file(tmp_path, run_cli):
    a, b = _pair(tmp_path, "gpt2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(f"w{(7 * i + j) % 90}" for j in range(12)) for i in range(30)))
    assert run_cli("merge", a, b, "--dataset", corpus, "-q", "-o", tmp_path / "merged") == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    reference = AutoModelForCausalLM.from_pretrained(a)
    assert torch.allclose(logits(merged, token_ids()), logits(reference, token_ids()), atol=1e-4)


def test_write_aligned_gives_the_same_function_lined_up_with_the_reference(tmp_path, run_cli):
    a, b = _pair(tmp_path, "llama")
    assert run_cli("align", a, b, "--matcher", "weight", "-q", "--write-aligned", tmp_path / "b_aligned") == 0
    aligned = AutoModelForCausalLM.from_pretrained(tmp_path / "b_aligned")
    original_b = AutoModelForCausalLM.from_pretrained(b)
    reference = AutoModelForCausalLM.from_pretrained(a)
    assert torch.allclose(logits(aligned, token_ids()), logits(original_b, token_ids()), atol=1e-5)
    for key, t in reference.state_dict().items():  # b was a planted permutation of a: aligned, it is a
        assert torch.equal(aligned.state_dict()[key], t), key
    record = json.loads((tmp_path / "b_aligned" / "aligned_to.json").read_text())
    assert record["alignment"]["matcher"] == "weight" and record["source"].endswith("b")


def test_text_column_without_a_text_data_set_is_refused(tmp_path, run_cli, capsys):
    a, b = _pair(tmp_path, "llama")
    assert run_cli("align", a, b, "--text-column", "verse", "-o", tmp_path / "perms") == 2
    assert "--text-column names a column of a text --dataset" in capsys.readouterr().err
    assert not (tmp_path / "perms").exists()


def _heldout(tmp_path):
    corpus = tmp_path / "heldout.txt"
    corpus.write_text("\n".join(" ".join(f"w{(5 * i + 3 * j) % 90}" for j in range(10)) for i in range(12)))
    return corpus


def test_evaluate_text_models_on_held_out_text(tmp_path, run_cli):
    """Model folders (a planted permutation of one net): weight matching, and the held-out loss along lambda is
    flat on the permuted path (one function all along), with the curves, the plot and the merged model written."""
    a, b = _pair(tmp_path, "llama")
    out = tmp_path / "eval"
    assert run_cli("evaluate", a, b, "--dataset", _heldout(tmp_path), "-q", "-o", out) == 0
    report = json.loads((out / "report.json").read_text())
    curve = report["curves"]["final"]["heldout"]
    assert report["alignment"]["matcher"] == "weight" and report["tokens"]["heldout"] == 12 * 10
    assert max(curve["permuted"]["loss"]) - min(curve["permuted"]["loss"]) < 1e-4
    assert curve["barrier"]["permuted"] == pytest.approx(0, abs=1e-4)
    assert (out / "text_curves.png").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    reference = AutoModelForCausalLM.from_pretrained(a)
    assert torch.allclose(logits(merged, token_ids()), logits(reference, token_ids()), atol=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        ((), "name the held-out text their curves are measured on with --dataset"),
        (("--set", "alignment.matcher=activation"), "are aligned by weight matching here"),
        (("--text-column", "verse"), "--text-column qualifies --dataset"),
    ],
)
def test_evaluate_text_models_refusals(tmp_path, run_cli, capsys, extra, message):
    a, b = _pair(tmp_path, "llama")
    heldout = () if extra and extra[0] == "--text-column" or not extra else ("--dataset", _heldout(tmp_path))
    assert run_cli("evaluate", a, b, *heldout, *extra, "-q", "-o", tmp_path / "eval") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0, err
    assert not (tmp_path / "eval").exists()
