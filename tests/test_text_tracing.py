"""Text transformers traced from their graphs: GPT-2, LLaMA-style (RoPE, RMSNorm, grouped-query attention, tied and
untied embeddings), Qwen2-style (q/k/v biases), BERT (MLM head tied to the word embeddings)."""

import warnings

import pytest
import torch
from text_models import logits, permuted_copy, tiny, token_ids

from hf_permerge.alignment import WeightMatcher
from hf_permerge.alignment.tracing import attach_permutation_spec, trace
from hf_permerge.alignment.tracing.build import permuted_share

ARCHS = ["gpt2", "llama", "llama_mha", "llama_mqa", "llama_tied", "qwen2", "qwen3", "phi3", "gpt_neox", "bert"]


def _traced(arch):
    model = tiny(arch).eval()
    return model, trace(model, {"input_ids": token_ids()})


@pytest.mark.parametrize("arch", ARCHS)
def test_text_model_traces_with_its_residual_stream_and_mlp_permuted(arch):
    model, traced = _traced(arch)  # trace() runs the invariance check: random permutations, same logits
    spec = traced.spec
    stream = spec.groups[0]
    assert stream.size == model.config.hidden_size
    keys = {k for k, _ in stream.axes}
    embedding = next(k for k in model.state_dict() if "embed" in k or "wte" in k)
    assert embedding in keys
    head = "cls.predictions.decoder.weight" if arch == "bert" else "lm_head.weight"
    assert head in keys  # tied or not, the output embedding's input axis is the stream
    mlp = [g for g in spec.groups if g.size == getattr(model.config, "intermediate_size", 4 * model.config.hidden_size)]
    assert len(mlp) == model.config.num_hidden_layers
    assert permuted_share(spec, model.state_dict()) > 0.9


def test_gated_mlp_shares_one_permutation_between_gate_and_up():
    _, traced = _traced("llama")
    group = traced.spec["model.layers.0.mlp.gate_proj"]
    assert {k for k, _ in group.axes} == {
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    }


def _keys(group):
    return {k for k, _ in group.axes}


def test_rotary_heads_move_whole_with_their_query_key_units_in_order():
    _, traced = _traced("llama_mha")  # trace() checked that moving whole heads keeps the logits
    spec, attn = traced.spec, "model.layers.0.self_attn"
    qk, values = spec[f"{attn}.q_proj"], spec[f"{attn}.v_proj"]
    assert (qk.blocks, qk.rigid, _keys(qk)) == (4, True, {f"{attn}.q_proj.weight", f"{attn}.k_proj.weight"})
    assert (values.blocks, values.rigid) == (4, False)  # one value head per query head: values move inside heads
    assert _keys(values) == {f"{attn}.v_proj.weight", f"{attn}.o_proj.weight"}
    assert (qk.name, values.name) in spec.couplings
    assert not traced.kept  # the rotary frequencies no longer hold the heads in place


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_grouped_query_heads_move_with_their_key_value_head(arch):
    model, traced = _traced(arch)
    spec, attn = traced.spec, "model.layers.0.self_attn"
    bias = {f"{attn}.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")} if arch == "qwen2" else set()
    queries, keys, values = (spec[f"{attn}.{p}_proj"] for p in "qkv")
    # 2 key/value heads of 8 units, each read by 2 query heads: the query heads of a block permute (runs)
    assert (queries.size, queries.blocks, queries.rigid, queries.runs) == (32, 2, True, 2)
    assert _keys(queries) == {f"{attn}.q_proj.weight", f"{attn}.o_proj.weight"} | (bias & {f"{attn}.q_proj.bias"})
    assert (keys.size, keys.blocks, keys.rigid) == (16, 2, True)  # rotary: in order within a head
    assert _keys(keys) == {f"{attn}.k_proj.weight"} | (bias & {f"{attn}.k_proj.bias"})
    assert (values.size, values.blocks, values.rigid) == (16, 2, False)  # values move within their head ...
    assert {k for k, _ in values.axes} == {f"{attn}.v_proj.weight"} | (bias & {f"{attn}.v_proj.bias"})
    (key, axis, part), *_ = values.parts  # ... alike on the o_proj inputs of both query heads reading them
    assert (key, axis, part.within, part.reps) == (f"{attn}.o_proj.weight", 1, True, 2)
    assert (queries.name, keys.name, values.name) in spec.couplings
    assert len(spec.couplings) == model.config.num_hidden_layers and not traced.kept


def test_qwen2_query_key_value_biases_follow_their_units():
    _, traced = _traced("qwen2")
    stream = {k for k, _ in traced.spec.groups[0].axes}
    assert "model.layers.0.self_attn.q_proj.weight" in stream
    assert "model.layers.0.self_attn.q_proj.bias" not in stream  # biases are per output unit, kept with q


def test_bert_heads_move_and_its_mlm_transform_is_permuted_on_both_axes():
    _, traced = _traced("bert")
    stream = traced.spec.groups[0]
    axes = {(k, a) for k, a in stream.axes}
    assert ("cls.predictions.transform.dense.weight", 0) in axes
    assert ("cls.predictions.transform.dense.weight", 1) in axes
    assert traced.spec.couplings  # whole heads move, queries/keys with values


def test_gpt2_fused_qkv_projection_is_split_into_parts_and_its_conv1d_layers_are_seen():
    model, traced = _traced("gpt2")
    assert not traced.kept and not traced.skipped
    d, heads = model.config.n_embd, model.config.n_head
    base = "transformer.h.0.attn"
    qk, v = traced.spec[f"{base}.c_attn@0"], traced.spec[f"{base}.c_attn@{2 * d}"]
    w = f"{base}.c_attn.weight"  # Conv1D: (in, out); outputs [q | k | v]
    assert {(k, a, p.start) for k, a, p in qk.parts if k == w} == {(w, 1, 0), (w, 1, d)}  # q and k: one group
    assert {(k, a, p.start) for k, a, p in v.parts if k == w} == {(w, 1, 2 * d)}
    assert (f"{base}.c_proj.weight", 0) in v.axes
    assert (qk.blocks, qk.rigid, v.blocks, v.rigid) == (heads, False, heads, False)  # units move within heads
    assert (qk.name, v.name) in traced.spec.couplings or (v.name, qk.name) in traced.spec.couplings  # whole heads
    assert qk.activation == f"{base}.c_attn" and qk.activation_part.start == 0  # the queries' part of c_attn
    fc = traced.spec["transformer.h.0.mlp.c_fc"]
    assert ("transformer.h.0.mlp.c_fc.weight", 1) in fc.axes  # Conv1D stores (in, out)


def test_a_model_whose_spec_would_move_little_is_refused_or_loudly_warned():
    model = torch.nn.Linear(8, 2)  # nothing hidden: its only units are the output's
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="has no permutation group.*plain averaging"):
        trace(model, (x,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not trace(model, (x,), on_unsupported="skip").spec.groups
    assert any("plain averaging" in str(w.message) for w in caught)


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_matching_undoes_a_planted_permutation(arch):
    model, traced = _traced(arch)
    other = permuted_copy(model)
    ids = token_ids()
    assert torch.allclose(logits(model, ids), logits(other, ids), atol=1e-5)
    for m in (model, other):
        attach_permutation_spec(m, traced.spec)
    perms = WeightMatcher().match(model, other)
    aligned = perms.apply(other)
    for key, t in model.state_dict().items():
        assert torch.equal(aligned.state_dict()[key], t), key


class RotaryAttention(torch.nn.Module):
    """One attention layer with a rotary-style embedding (a buffer outside the state dict scales each head's units,
    rotate_half swaps their halves) and optionally a learned scale per head, which pins the heads in place."""

    def __init__(self, width=16, heads=4, head_scale=False):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width) for _ in range(4))
        self.register_buffer("freq", torch.rand(width // heads) + 0.5, persistent=False)
        self.head_scale = torch.nn.Parameter(torch.rand(heads, 1, 1) + 0.5) if head_scale else None

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = (p(x).view(n, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        half = q.shape[-1] // 2
        q = q * self.freq + torch.cat([-q[..., half:], q[..., :half]], -1)
        if self.head_scale is not None:
            q = q * self.head_scale
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(n, t, -1))


def test_rotary_heads_that_cannot_move_are_kept_with_their_units_in_order():
    x = torch.randn(2, 5, 16)
    free = trace(RotaryAttention(), (x,)).spec
    assert free["q"].rigid and free.couplings == (("q", "v"),)
    pinned = trace(RotaryAttention(head_scale=True), (x,))  # moving whole heads fails the invariance check
    assert not pinned.spec.couplings and "q" in pinned.kept and "q" not in pinned.spec.names
    assert pinned.spec["v"].blocks == 4  # values still move within their heads
