"""Half-precision checkpoints are traced and checked in float32: a sound spec is never refused as wrong."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from text_models import permuted_copy

from hf_permerge.alignment.tracing import attach_permutation_spec, check_permutation_invariance, trace
from hf_permerge.alignment.weight import WeightMatcher


def _llama(dtype, layers=8, hidden=512):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=97,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return T.LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_8_layer_half_precision_llama_is_traced_without_a_false_alarm(dtype):
    model = _llama(dtype)
    traced = trace(model)  # the invariance check runs inside; it used to refuse bf16 as "the spec is wrong"
    assert not traced.skipped and len(traced.spec.groups) > 8
    assert all(t.dtype == dtype for t in model.state_dict().values() if t.is_floating_point())  # left as it was


def test_a_wrong_spec_is_still_refused_in_bf16():
    model = _llama(torch.bfloat16, layers=2, hidden=64)
    spec = trace(model).spec
    mlp = spec["model.layers.0.mlp.gate_proj"]
    broken = type(spec)(
        tuple(
            type(g)(g.name, g.size, tuple(a for a in g.axes if "up_proj" not in a[0]), g.activation, g.preactivation)
            if g is mlp
            else g
            for g in spec.groups
        ),
        spec.couplings,
    )
    with pytest.raises(AssertionError, match="model.layers.0.mlp.gate_proj"):
        check_permutation_invariance(model, broken)


def test_a_planted_bf16_llama_is_merged_back_exactly():
    model = _llama(torch.bfloat16, layers=2, hidden=64)
    other = permuted_copy(model.float()).to(torch.bfloat16)
    model = model.to(torch.bfloat16)
    spec = trace(model).spec
    for m in (model, other):
        attach_permutation_spec(m, spec)
    aligned = WeightMatcher().match(model, other).apply(other)
    for key, t in model.state_dict().items():
        assert torch.equal(aligned.state_dict()[key], t), key
