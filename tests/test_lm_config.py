"""The run config of a language model: `model.type: transformers` names an architecture and its config's fields;
every mistake is refused before any work, naming the key."""

import copy

import pytest

from hf_permerge.config import ConfigError, apply_overrides, config_from_dict, load_config
from hf_permerge.training import build_model, model_config_for

LLAMA = {
    "model": {
        "type": "transformers",
        "model_type": "llama",
        "config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    },
    "data": {"dataset": "kjv", "vocab_size": 300, "block_size": 16},
}


def load(*overrides, base=LLAMA):
    data = apply_overrides(copy.deepcopy(base), list(overrides))
    return config_from_dict(data, "lm.yaml", list(overrides))


def test_set_reaches_a_field_of_the_transformers_config():
    cfg = load("model.config.hidden_size=64", "model.config.num_hidden_layers=3")
    hf = model_config_for(cfg)
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_key_value_heads) == (64, 3, 2)


def test_vocabulary_special_tokens_and_positions_come_from_the_data():
    hf = model_config_for(load("data.block_size=24"))
    assert hf.vocab_size == 300 and hf.max_position_embeddings == 24
    assert hf.bos_token_id == hf.eos_token_id == hf.pad_token_id == 0


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.config.hidden_sizee=64",
            r"model.config.hidden_sizee: not a key of llama's config \(did you mean 'hidden_size'\?\)",
        ),
        ("model.config.hidden_size=big", "model.config.hidden_size: .*expected int"),
        ("model.config.num_key_value_heads=3", "model.config.num_key_value_heads: 3 must divide num_attention_heads"),
        ("model.config.vocab_size=100", "model.config.vocab_size is set from the tokenizer; set data.vocab_size"),
        ("model.config.max_position_embeddings=8", "max_position_embeddings 8 is shorter than data.block_size 16"),
        (
            "model.model_type=lama",
            r"model.model_type: 'lama' is not a transformers architecture \(did you mean 'llama'",
        ),
        ("data.dataset=fashion_mnist", "data.dataset fashion_mnist is images, but model.type transformers"),
        ("training.engine=stacked", "training.engine: stacked is for the MLP and CNN"),
    ],
)
def test_mistakes_are_refused_naming_the_key_and_the_override(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load(override)
    assert f"[from --set {override}]" in str(err.value)


def test_another_architecture_checks_the_keys_against_its_own_config():
    with pytest.raises(ConfigError, match=r"model.config.intermediate_size: not a key of gpt2's config"):
        load("model.model_type=gpt2")  # hidden_size is one of its aliases (n_embd); intermediate_size is not
    gpt2 = load("model.model_type=gpt2", "model.config={n_embd: 32, n_layer: 2, n_head: 4}")
    assert model_config_for(gpt2).n_positions == 16


def test_an_architecture_without_a_causal_lm_head_is_refused():
    with pytest.raises(ConfigError, match="'t5' has neither a causal-LM head"):
        load("model.model_type=t5", "model.config={}")
    with pytest.raises(ConfigError, match="data.dataset kjv is text, but .* model_type vit is an image classifier"):
        load("model.model_type=vit", "model.config={}")


def test_text_needs_a_language_model():
    with pytest.raises(ConfigError, match="data.dataset kjv is text, but model.type mlp is an image classifier"):
        config_from_dict({"data": {"dataset": "kjv"}})


def test_same_seed_same_init_other_seed_other_init():
    import torch

    a, b = build_model(load(), 0).state_dict(), build_model(load(), 0).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = build_model(load(), 1).state_dict()
    reseeded = build_model(load("training.seed=1"), 0).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[name], other[name]) and not torch.equal(a[name], reseeded[name])


def test_building_a_model_leaves_the_global_generator_alone():
    import torch

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_model(load(), 0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", ["kjv_llama_tiny", "kjv_gpt2_tiny"])
def test_shipped_configs_build_the_architecture_they_name(name):
    from pathlib import Path

    import torch

    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    with torch.device("meta"):
        model = build_model(cfg, 0)
    params = sum(p.numel() for p in model.parameters())
    assert 1e6 < params < 1e7, params
    hf = model.config
    if name == "kjv_llama_tiny":
        assert hf.num_key_value_heads < hf.num_attention_heads and not hf.tie_word_embeddings
    else:
        assert hf.model_type == "gpt2" and hf.resid_pdrop == hf.embd_pdrop == hf.attn_pdrop == 0.0
