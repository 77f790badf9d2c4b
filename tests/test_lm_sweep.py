"""The language-model sweep: seeds x architectures, each cell a trained pair measured on held-out text; grid keys
reach inside model.config. No corpus: the fake text of conftest `fake_bible`."""

import json
from pathlib import Path

import pytest
import torch

from hf_permerge.config import ConfigError
from hf_permerge.sweeps import load_sweep_config, run_sweep

SWEEP = Path(__file__).parents[1] / "configs" / "sweeps" / "kjv_seeds_architectures.yaml"
TINY = [
    "data.vocab_size=300",
    "data.block_size=16",
    "data.heldout_every=4",
    "training.batch_size=8",
    "training.epochs=1",
    "training.eval_steps=2",
    "training.warmup_steps=1",
    "sweep.cases.llama.model.config={hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
    "num_attention_heads: 4, num_key_value_heads: 2, tie_word_embeddings: false}",
    "sweep.cases.gpt2.model.config={hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 4}",
    "sweep.grid.training.seed=[0, 1]",
]


def test_shipped_sweep_is_seeds_times_architectures():
    config = load_sweep_config(SWEEP)
    archs = [(c.values["case"], c.config.model.model_type, c.config.training.seed) for c in config.cells]
    assert archs == [(a, a, s) for a in ("llama", "gpt2") for s in (0, 1, 2)]
    gpt2 = config.cells[-1].config.model.config
    assert gpt2["hidden_size"] == 192 and gpt2["resid_pdrop"] == 0.0  # GPT-2 reads hidden_size as n_embd


def test_a_grid_key_inside_model_config_varies_that_field_of_every_architecture():
    config = load_sweep_config(SWEEP, ["sweep.grid.model.config.hidden_size=[96, 192]"])
    assert {(c.config.model.model_type, c.config.model.config["hidden_size"]) for c in config.cells} == {
        (a, h) for a in ("llama", "gpt2") for h in (96, 192)
    }
    assert config.cells[0].id == "case=llama_seed=0_hidden_size=96"
    with pytest.raises(ConfigError, match="model.config.hidden_sizee: not a key of llama's config"):
        load_sweep_config(SWEEP, ["sweep.grid.model.config.hidden_sizee=[96]"])
    with pytest.raises(ConfigError, match=r"did you mean model.config\?"):
        load_sweep_config(SWEEP, ["sweep.grid.model.confg.hidden_size=[96]"])


def test_language_models_are_refused_by_the_merging_experiments_before_any_work():
    with pytest.raises(ConfigError, match="set sweep.experiment: train"):
        load_sweep_config(SWEEP, ["sweep.experiment=pair"])


def test_sweep_trains_every_cell_and_plots_the_held_out_curves(tmp_path, fake_bible):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = load_sweep_config(SWEEP, TINY)
        result = run_sweep(config, tmp_path / "out", progress=False)
    finally:
        torch.set_num_threads(before)
    assert not result.failed and len(result.ran) == 4
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    for cell in out["cells"]:
        assert cell["single_loss"] == pytest.approx(cell["single_loss_t6"]) and cell["single_loss_t2"] > 0
    summary = {row["case"]: row for row in out["summary"]}
    assert summary.keys() == {"llama", "gpt2"} and all(row["n"] == 2 for row in summary.values())
    assert (tmp_path / "out" / "kjv_seeds_architectures.png").stat().st_size > 10_000
    trained = json.loads((tmp_path / "out" / "cells" / "case=gpt2_seed=1" / "result.json").read_text())
    assert trained["timings"]["trained_together"] == 2  # the two seeds of a case trained as one stack
