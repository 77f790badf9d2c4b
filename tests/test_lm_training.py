"""PairTrainer on language models: N tiny LMs from a transformers config, differing only in seed, inits kept,
resumable, each checkpoint a folder that `AutoModelForCausalLM` and `AutoTokenizer` read."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_permerge import PermMerger
from hf_permerge.training import PairTrainer, build_model, engines

GPT2 = {"type": "transformers", "model_type": "gpt2", "config": {"n_embd": 16, "n_layer": 2, "n_head": 4}}


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_pair_of_language_models_is_a_pair_folder_of_hf_models(tmp_path, tiny_lm_config):
    cfg = tiny_lm_config(training={"eval_steps": 4})
    result = PairTrainer(cfg, tmp_path / "pair", progress=False).train()
    pair = json.loads((tmp_path / "pair/pair.json").read_text())
    assert pair["checkpoints"] == ["init", "step-3", "final"] and pair["steps"]["total"] == 12
    assert pair["data"]["test_books"] == ["Num", "Ruth", "2Ki"] and pair["data"]["examples"] == "blocks"
    for i in range(2):
        for ck in pair["checkpoints"]:
            folder = tmp_path / "pair" / f"net_{i}" / ck
            model = AutoModelForCausalLM.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 2
            assert tokenizer.eos_token_id == model.config.eos_token_id and len(tokenizer) <= model.config.vocab_size
            ids = tokenizer("and the lord said", return_tensors="pt").input_ids
            assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 300)
        assert_same(weights(tmp_path / "pair" / f"net_{i}" / "init"), build_model(cfg, i).state_dict())
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(weights(tmp_path / "pair/net_0/init")[name], weights(tmp_path / "pair/net_1/init")[name])
    assert pair["seeds"][0]["data"] != pair["seeds"][1]["data"]
    for net in pair["nets"]:  # held-out loss at steps 4, 6 (epoch end), 8 and 12 (the end), falling from log(V)
        history = net["log_history"]
        assert [h["step"] for h in history] == [4, 6, 8, 12]
        assert history[-1]["test_loss"] == pytest.approx(net["test"]["loss"], rel=1e-5)
        assert history[-1]["test_loss"] < history[0]["test_loss"] < math.log(300)
    assert [m["test"]["loss"] for m in result.metrics] == [n["test"]["loss"] for n in pair["nets"]]


def test_tied_embeddings_are_saved_once_and_tied_again_on_load(tmp_path, tiny_lm_config):
    PairTrainer(tiny_lm_config(model=GPT2, training={"max_steps": 3}), tmp_path / "p", progress=False).train()
    saved = weights(tmp_path / "p/net_0/final")
    assert "lm_head.weight" not in saved and "transformer.wte.weight" in saved
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "p/net_0/final")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.transformer.wte.weight, saved["transformer.wte.weight"])


@pytest.mark.parametrize("model", [None, GPT2], ids=["llama", "gpt2"])
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, tiny_lm_config, monkeypatch, model):
    """Killed mid-way through epoch 2 and resumed from the end of epoch 1: the same weights, bit for bit, and
    the same held-out curve (warm-up and cosine schedule included: the rate is a function of the step)."""
    sections = {"training": {"epochs": 3, "eval_steps": 4, "lr_schedule": "cosine", "warmup_steps": 2}}
    cfg = tiny_lm_config(**sections, **({"model": model} if model else {}))
    PairTrainer(cfg, tmp_path / "full", progress=False).train()

    calls = {"n": 0}
    real_step = engines.PerNetEngine.step

    def crashing_step(self, xs, ys):
        calls["n"] += 1
        if calls["n"] == 9:  # step 9: mid-way through epoch 2 (6 steps an epoch)
            raise KeyboardInterrupt
        return real_step(self, xs, ys)

    monkeypatch.setattr(engines.PerNetEngine, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        PairTrainer(cfg, tmp_path / "cut", progress=False).train()
    monkeypatch.setattr(engines.PerNetEngine, "step", real_step)
    assert (tmp_path / "cut/net_0/resume-step-6").is_dir()
    PairTrainer(cfg, tmp_path / "cut", resume=True, progress=False).train()
    for i in range(2):
        for ck in ("init", "step-3", "final"):
            assert_same(weights(tmp_path / f"full/net_{i}/{ck}"), weights(tmp_path / f"cut/net_{i}/{ck}"))
    full, cut = (json.loads((tmp_path / p / "pair.json").read_text())["nets"] for p in ("full", "cut"))
    assert [n["log_history"] for n in full] == [n["log_history"] for n in cut]


def test_nets_trained_together_equal_nets_trained_alone_dropout_included(tmp_path, tiny_lm_config):
    """Each net depends on its own seeds only (GPT-2's default dropout 0.1 draws from the net's own stream): net 1
    of a pair is net 1 of a run of three, whatever torch's generator held before."""
    assert tiny_lm_config(model=GPT2).model.config.get("resid_pdrop") is None  # the default, 0.1
    torch.manual_seed(1)
    PairTrainer(tiny_lm_config(model=GPT2, training={"max_steps": 4}), tmp_path / "two", progress=False).train()
    torch.manual_seed(2)
    three = tiny_lm_config(model=GPT2, training={"max_steps": 4, "num_nets": 3})
    PairTrainer(three, tmp_path / "three", progress=False).train()
    assert_same(weights(tmp_path / "two/net_1/final"), weights(tmp_path / "three/net_1/final"))
    assert not torch.equal(
        weights(tmp_path / "two/net_1/final")["transformer.h.0.attn.c_attn.weight"],
        weights(tmp_path / "two/net_1/init")["transformer.h.0.attn.c_attn.weight"],
    )


def test_learning_rate_warms_up_then_decays_to_zero():
    from types import SimpleNamespace

    from hf_permerge.training.schedule import lr_at

    tc = SimpleNamespace(lr=1.0, lr_schedule="cosine", warmup_steps=4)
    rates = [lr_at(tc, s, 20) for s in range(20)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0] and rates[4] == 1.0
    assert all(a > b for a, b in zip(rates[4:], rates[5:])) and rates[-1] < 0.01


def test_missing_bible_is_one_line_from_the_cli_and_writes_nothing(tmp_path, run_cli, monkeypatch, capsys):
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(
        "model: {type: transformers, model_type: llama, config: {hidden_size: 16, intermediate_size: 32, "
        "num_hidden_layers: 1, num_attention_heads: 2}}\ndata: {dataset: kjv}\n"
    )
    monkeypatch.setenv("PATH", str(tmp_path))  # no `bible` on it
    monkeypatch.setenv("HF_PERMERGE_CACHE", str(tmp_path / "cache"))
    assert run_cli("train", cfg, "--output-dir", tmp_path / "out", "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.endswith("install it with `apt-get install -y bible-kjv`"), err
    assert not (tmp_path / "out").exists()


def test_run_refuses_a_language_model_before_training(tmp_path, tiny_lm_config):
    from hf_permerge.reporting.pipeline import run

    with pytest.raises(ValueError, match="is text: `run` reports on image classifiers"):
        run(tiny_lm_config(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("matcher", ["weight", "activation"])
def test_a_trained_pair_merges(tmp_path, tiny_lm_config, matcher):
    """The pair folder is what `PermMerger.from_pretrained` reads: traced spec, weight matching or activation
    matching on the held-out blocks (as a `datasets.Dataset`), a merged model saved with the pair's tokenizer."""
    from hf_permerge.data.text import load_text_splits
    from hf_permerge.merging import PermMerger

    cfg = tiny_lm_config(training={"max_steps": 3})
    PairTrainer(cfg, tmp_path / "pair", progress=False).train()
    merger = PermMerger.from_pretrained(tmp_path / "pair")
    if matcher == "weight":
        merger.align(matcher="weight", checkpoint="final")
    else:
        _, heldout = load_text_splits("kjv", cfg.data.vocab_size, cfg.data.block_size, cfg.data.heldout_every)
        merger.align(heldout.to_dataset(), matcher="activation", checkpoint="final")
    merger.save_pretrained(tmp_path / "merged", merger.merge(0.5, "final"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = AutoTokenizer.from_pretrained(tmp_path / "merged")("and the lord", return_tensors="pt").input_ids
    assert torch.isfinite(merged(input_ids=ids).logits).all()


def test_loading_models_on_threads_leaves_weight_tying_alone(tmp_path, tiny_lm_config):
    """`from_pretrained` swaps `PreTrainedModel.tie_weights` for a no-op while it loads; loads on threads (a sweep's
    measure workers) are serialised, so a model made afterwards still ties its embeddings."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoConfig, PreTrainedModel

    from hf_permerge.models.folders import load_model

    original = PreTrainedModel.tie_weights
    PairTrainer(tiny_lm_config(model=GPT2, training={"max_steps": 3}), tmp_path / "p", progress=False).train()
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: load_model(tmp_path / "p/net_0/final"), range(32)))
        assert PreTrainedModel.tie_weights is original
    finally:
        PreTrainedModel.tie_weights = original  # a failure here must not untie every later test's models
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=8, n_layer=1, n_head=2))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_evaluate_a_trained_pair_of_language_models(tmp_path, tiny_lm_config, run_cli):
    """`hf-permerge evaluate PAIR` on a trained LM pair: aligned on its training blocks, held-out loss along lambda
    for the trained nets and their inits, both ends equal to each net's own held-out loss."""
    PairTrainer(tiny_lm_config(training={"max_steps": 3}), tmp_path / "pair", progress=False).train()
    out = tmp_path / "eval"
    assert run_cli("evaluate", tmp_path / "pair", "-q", "-o", out, "--set", "evaluation.num_lambdas=3") == 0
    report = json.loads((out / "report.json").read_text())
    pair = json.loads((tmp_path / "pair/pair.json").read_text())
    assert report["kind"] == "text" and report["alignment"]["matcher"] == "activation"
    assert set(report["curves"]) == {"final", "init"} and set(report["curves"]["final"]) == {"test", "train"}
    test = report["curves"]["final"]["test"]
    for path in ("vanilla", "permuted"):  # lambda 0 and 1 are the nets themselves
        assert test[path]["loss"][0] == pytest.approx(pair["nets"][0]["test"]["loss"], rel=1e-4)
        assert test[path]["loss"][-1] == pytest.approx(pair["nets"][1]["test"]["loss"], rel=1e-4)
    assert (out / "text_curves.png").is_file() and (out / "permutations").is_dir()
    assert AutoModelForCausalLM.from_pretrained(out / "merged").config.model_type == "llama"


def test_evaluate_on_a_text_pair_with_heads_kept_keeps_every_head(tmp_path, tiny_lm_config, run_cli):
    """`alignment.heads: keep` reaches the text path's matcher: every attention group's permutation leaves each
    head in its place (its units may move within it), while the residual stream and the MLPs still move."""
    from hf_permerge.alignment.permutations import Permutations

    PairTrainer(tiny_lm_config(training={"max_steps": 3}), tmp_path / "pair", progress=False).train()
    out = tmp_path / "eval"
    args = ("evaluate", tmp_path / "pair", "-q", "-o", out, "--set", "evaluation.num_lambdas=3")
    assert run_cli(*args, "--set", "alignment.heads=keep", "--set", "alignment.matcher=weight") == 0
    perms = Permutations.load(out / "permutations" / "net_1.safetensors")
    merger = PermMerger.from_pretrained(tmp_path / "pair")
    coupled = {n for c in merger.spec.couplings for n in c}
    assert coupled  # the tiny LLaMA's attention layers move heads by default
    for name in coupled:
        g = merger.spec[name]
        width = g.size // g.blocks
        assert torch.equal(perms[name] // width, torch.arange(g.size) // width), name  # each unit in its own head
