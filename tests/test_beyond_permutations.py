"""Symmetries beyond permutations: signed permutations and orthogonal maps of the residual stream (after folding the
norms), invertible maps per attention head (rotation-scalings under rotary embeddings), and their refusals. Every
planted element is written by hand per layout in `beyond_models`, never taken from the tracer; the aligned merge gives
the first net back up to float32 rounding, and the aligned net computes the first net's function."""

import pytest
import torch
import transformers as T
from beyond_models import (
    folded,
    head_maps,
    planted_orthogonal,
    planted_per_head,
    planted_phi_heads,
    planted_phi_rotation,
    planted_signed,
    tiny_neox,
    tiny_phi,
    with_gains,
)
from text_models import logits, tiny, token_ids

from hf_permerge.alignment import WeightMatcher, get_matcher
from hf_permerge.alignment.tracing import attach_permutation_spec, trace
from hf_permerge.alignment.transforms import load_transforms, merge_aligned, merge_all, save_transforms
from hf_permerge.data.tokens import TokenSplit

RMS = ["llama", "llama_mha", "qwen2"]


def _traced(model):
    attach_permutation_spec(model, trace(model, {"input_ids": token_ids()}).spec)
    return model


def _model(arch, sd):
    """A model of `arch` holding `sd`, its spec traced (the tracer sees shapes only: any weights do)."""
    m = tiny(arch)
    m.load_state_dict(sd)
    return _traced(m.eval())


def _same_function(a, b, atol=1e-4):
    ids = token_ids(seed=7)
    return torch.allclose(logits(a, ids), logits(b, ids), atol=atol)


def test_rmsnorm_is_odd_per_coordinate_and_layernorm_only_under_the_global_flip():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=gen)
    s = torch.tensor([1.0, -1, 1, 1, -1, -1, 1, -1])
    rms = torch.nn.RMSNorm(8, eps=1e-6)
    ln = torch.nn.LayerNorm(8)
    with torch.no_grad():
        rms.weight.uniform_(0.5, 1.5)
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
        assert torch.allclose(rms(x * s), rms(x) * s, atol=1e-6)  # gains kept
        flipped = torch.nn.LayerNorm(8)
        flipped.weight.copy_(ln.weight)
        flipped.bias.copy_(ln.bias * s)  # the best LayerNorm can do: its bias flipped with its coordinate
        assert not torch.allclose(flipped(x * s), ln(x) * s, atol=1e-2)  # mean-centering mixes the coordinates
        flipped.bias.copy_(-ln.bias)
        assert torch.allclose(flipped(-x), -ln(x), atol=1e-6)  # flipping every coordinate holds
        q = torch.linalg.qr(torch.randn(8, 8, generator=gen))[0]
        unit = torch.nn.RMSNorm(8, eps=1e-6)
        assert torch.allclose(unit(x @ q.T), unit(x) @ q.T, atol=1e-5)  # gain 1: any orthogonal map
        assert not torch.allclose(rms(x @ q.T), rms(x) @ q.T, atol=1e-2)  # a gain left unfolded breaks it


@pytest.mark.parametrize("source", ["weight", "activation"])
@pytest.mark.parametrize("arch", RMS + ["llama_tied"])
def test_signed_matching_undoes_planted_signed_permutations(arch, source):
    a = _traced(tiny(arch).eval())
    b = _model(arch, planted_signed(a))
    assert _same_function(a, b)  # the planted element is a symmetry
    plain = WeightMatcher().match(a, b).apply(b)
    assert not torch.allclose(
        plain.state_dict()["model.embed_tokens.weight"], a.state_dict()["model.embed_tokens.weight"]
    )
    ids = token_ids(n=8, length=16, seed=3)
    data = TokenSplit(ids, torch.ones_like(ids), "planted")
    tr = get_matcher("symmetry", symmetry="signed", source=source).match(a, b, data)
    mlp = [f"model.layers.{i}.mlp.gate_proj" for i in range(a.config.num_hidden_layers)]
    assert set(tr.signs) == {"model.embed_tokens", *mlp}  # the stream and the SwiGLU units, nothing else
    assert ("model.layers.0.mlp.gate_proj.weight", 0) in tr.plain[mlp[0]]  # gate rows: no signs
    aligned = tr.apply(b)
    for key, t in a.state_dict().items():
        assert torch.allclose(aligned.state_dict()[key], t, atol=1e-6), key
    merged = merge_aligned(a, b, tr)
    assert all(torch.allclose(merged.state_dict()[k], t, atol=1e-6) for k, t in a.state_dict().items())
    assert _same_function(aligned, a, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_a_layernorm_stream_refuses_signs_naming_the_norm(arch):
    a = _traced(tiny(arch).eval())
    norm = "transformer.h.0.ln_1" if arch == "gpt2" else "bert.embeddings.LayerNorm"
    with pytest.raises(ValueError, match=f"passes {norm} \\(LayerNorm\\)") as caught:
        get_matcher("symmetry", symmetry="signed").match(a, a)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "arch, overrides, why",
    [
        (
            "gpt2",
            {},
            "transformer.ln_f's gain cannot fold into lm_head.weight, which is tied to transformer.wte.weight",
        ),
        ("gpt2", {"tie_word_embeddings": False}, "transformer.ln_f's bias cannot fold into lm_head, which has no bias"),
        ("bert", {}, "cls.predictions.transform.LayerNorm's gain cannot fold into cls.predictions.decoder.weight"),
        ("bert", {"tie_word_embeddings": False}, "folding bert.embeddings.LayerNorm's gain changes the function"),
    ],
)
def test_a_layernorm_stream_refuses_an_orthogonal_map_where_its_norms_cannot_fold(arch, overrides, why):
    a = _traced(with_gains(tiny(arch, **overrides)).eval())
    with pytest.raises(ValueError, match=why) as caught:
        get_matcher("symmetry", symmetry="orthogonal").match(a, a)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("arch", RMS)
@pytest.mark.parametrize("source", ["weight", "activation"])
def test_orthogonal_stream_matching_undoes_a_planted_rotation_after_folding_the_gains(arch, source, tmp_path):
    a = _traced(with_gains(tiny(arch)).eval())
    b = _model(arch, planted_orthogonal(a))
    assert _same_function(a, b)
    ids = token_ids(n=8, length=16, seed=3)
    data = TokenSplit(ids, torch.ones_like(ids), "planted")
    tr = get_matcher("symmetry", symmetry="orthogonal", source=source).match(a, b, data)
    assert len(tr.folds) == 2 * a.config.num_hidden_layers + 1  # every RMSNorm's gain, into its readers
    reference = folded(a.state_dict(), a.config)  # what changes: the gains folded to 1
    merged = merge_aligned(a, b, tr)
    for key, t in reference.items():
        assert torch.allclose(merged.state_dict()[key], t, atol=2e-5), key
    assert _same_function(tr.apply(b), a) and _same_function(merged, a)
    merged.save_pretrained(tmp_path)  # an ordinary checkpoint of the same architecture
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(a) and _same_function(loaded, a)


def test_tied_embeddings_take_the_same_rotation_but_refuse_to_fold_a_final_gain_into_them():
    a = _traced(with_gains(tiny("llama_tied"), final=False).eval())  # final gain 1: nothing to fold into lm_head
    b = _model("llama_tied", planted_orthogonal(a))
    tr = get_matcher("symmetry", symmetry="orthogonal").match(a, b)
    assert _same_function(tr.apply(b), a) and _same_function(merge_aligned(a, b, tr), a)
    gained = _traced(with_gains(tiny("llama_tied")).eval())
    with pytest.raises(ValueError, match="model.norm's gain cannot fold into lm_head.weight, which is tied"):
        get_matcher("symmetry", symmetry="orthogonal").match(gained, gained)


def test_symmetry_settings_are_validated_by_their_declared_model():
    with pytest.raises(ValueError, match="symmetry"):
        get_matcher("symmetry", symmetry="affine")


@pytest.mark.parametrize(
    "arch, values_only, source",
    [
        ("gpt2", False, "weight"),
        ("bert", False, "weight"),
        ("llama_mha", False, "weight"),
        ("llama_mha", True, "weight"),
        ("llama", True, "weight"),  # grouped-query: B per key/value head on every query head reading it
        ("llama", True, "activation"),
        ("gpt2", False, "activation"),
        ("bert", False, "activation"),
        ("llama_mha", False, "activation"),
    ],
)
def test_per_head_matching_undoes_planted_invertible_maps_of_queries_keys_and_values(arch, values_only, source):
    a = _traced(tiny(arch).eval())
    b = _model(arch, planted_per_head(a, queries_keys=not values_only))
    assert _same_function(a, b)
    ids = token_ids(n=8, length=16, seed=3)
    maps = "values" if values_only else "all"
    tr = get_matcher("symmetry", symmetry="permutation", head_maps=maps, source=source).match(
        a, b, TokenSplit(ids, torch.ones_like(ids), "t")
    )
    assert len(tr.matrices) == a.config.num_hidden_layers * (1 if values_only else 2)
    aligned, merged = tr.apply(b), merge_aligned(a, b, tr)
    for key, t in a.state_dict().items():
        assert torch.allclose(aligned.state_dict()[key], t, atol=1e-4), key
        assert torch.allclose(merged.state_dict()[key], t, atol=1e-4), key
    assert _same_function(aligned, a) and _same_function(merged, a)


@pytest.mark.parametrize("arch", ["gpt2", "llama_mha"])
def test_procrustes_head_fits_undo_planted_orthogonal_head_maps(arch):
    a = _traced(tiny(arch).eval())
    b = _model(arch, planted_per_head(a, orthogonal=True))
    tr = get_matcher("symmetry", symmetry="permutation", head_maps="all", head_fit="procrustes").match(a, b)
    for m in tr.matrices.values():
        assert torch.allclose(m @ m.T, torch.eye(len(m), dtype=m.dtype), atol=1e-8)  # every head's map orthogonal
    aligned = tr.apply(b)
    for key, t in a.state_dict().items():
        assert torch.allclose(aligned.state_dict()[key], t, atol=1e-4), key
    assert _same_function(merge_aligned(a, b, tr), a)


def test_per_head_query_key_maps_are_refused_where_grouped_query_heads_split_queries_from_keys():
    gqa = _traced(tiny("llama").eval())
    with pytest.raises(ValueError, match="the queries and keys of model.layers.0.self_attn are in different groups"):
        get_matcher("symmetry", symmetry="permutation", head_maps="all").match(gqa, gqa)
    with pytest.raises(ValueError, match="no attention group of Sequential takes per-head maps"):
        get_matcher("symmetry", symmetry="permutation", head_maps="values").match(*[_plain_linear()] * 2)


def _plain_linear():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return attach_permutation_spec(model, trace(model, (torch.randn(2, 8),)).spec)


@pytest.mark.parametrize("source", ["weight", "activation"])
def test_layernorm_stream_takes_orthogonal_maps_fixing_the_ones_after_folding_weight_and_bias(source):
    a = _traced(with_gains(tiny_phi()).eval())
    reference, planted = planted_phi_rotation(a)
    b = tiny_phi()
    b.load_state_dict(planted)
    b = _traced(b.eval())
    assert _same_function(a, b)
    ids = token_ids(n=8, length=16, seed=3)
    tr = get_matcher("symmetry", symmetry="orthogonal", source=source).match(
        a, b, TokenSplit(ids, torch.ones_like(ids), "planted")
    )
    (stream,) = tr.fixes_ones
    assert torch.allclose(
        tr.matrices[stream] @ torch.ones(32, dtype=torch.float64), torch.ones(32, dtype=torch.float64)
    )
    merged = merge_aligned(a, b, tr)
    for key, t in reference.items():
        assert torch.allclose(merged.state_dict()[key], t, atol=2e-5), key
    assert _same_function(tr.apply(b), a) and _same_function(merged, a)


@pytest.mark.parametrize("source", ["weight", "activation"])
def test_an_orthogonal_stream_and_per_head_maps_together_are_undone(source, tmp_path):
    a = _traced(with_gains(tiny("llama_mha")).eval())
    b = _model("llama_mha", head_maps(planted_orthogonal(a), a.config))
    assert _same_function(a, b)
    ids = token_ids(n=8, length=16, seed=3)
    data = TokenSplit(ids, torch.ones_like(ids), "planted")
    tr = get_matcher("symmetry", symmetry="orthogonal", head_maps="all", source=source).match(a, b, data)
    assert len(tr.matrices) == 1 + 2 * a.config.num_hidden_layers  # the stream, and each layer's values and q/k
    save_transforms(tr, tmp_path / "t.safetensors")
    tr = load_transforms(tmp_path / "t.safetensors")  # what is merged below is what was saved
    merged = merge_aligned(a, b, tr)
    for key, t in folded(a.state_dict(), a.config).items():
        assert torch.allclose(merged.state_dict()[key], t, atol=1e-4), key
    assert _same_function(tr.apply(b), a) and _same_function(merged, a)


def test_three_nets_each_aligned_onto_the_first_average_back_to_it():
    a = _traced(with_gains(tiny("llama_mha")).eval())
    others = [_model("llama_mha", head_maps(planted_orthogonal(a, seed), a.config, seed=seed)) for seed in (1, 2)]
    matcher = get_matcher("symmetry", symmetry="orthogonal", head_maps="all")
    merged = merge_all([a, *others], [matcher.match(a, m) for m in others])
    for key, t in folded(a.state_dict(), a.config).items():
        assert torch.allclose(merged.state_dict()[key], t, atol=1e-4), key
    assert _same_function(merged, a)


def test_a_file_that_is_not_a_transforms_file_is_refused_naming_it(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors' is a safetensors file but not a transforms file"):
        load_transforms(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors transforms file"):
        load_transforms(tmp_path / "missing.safetensors")


def test_the_merger_refuses_a_matcher_whose_transforms_it_cannot_average(tmp_path):
    from hf_permerge import PermMerger

    a = tiny("llama").eval()
    for name, m in (("a", a), ("b", _model("llama", planted_signed(a)))):
        m.save_pretrained(tmp_path / name)
    merger = PermMerger.from_pretrained([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="beyond permutations, which the merger does not average yet"):
        merger.align(matcher="symmetry", symmetry="signed")


@pytest.mark.parametrize(
    "arch, settings",
    [
        ("llama", {"symmetry": "signed"}),
        ("qwen2", {"symmetry": "orthogonal"}),
        ("llama_mha", {"symmetry": "orthogonal", "head_maps": "all"}),
        ("gpt2", {"symmetry": "permutation", "head_maps": "all"}),
        ("bert", {"symmetry": "permutation", "head_maps": "all", "source": "activation"}),
        ("neox", {"symmetry": "permutation", "head_maps": "all"}),  # fused per-head q|k|v, partial rotary
        ("llama_mha", {"symmetry": "orthogonal", "head_maps": "all", "head_fit": "procrustes"}),
    ],
)
def test_what_is_found_for_two_unrelated_nets_is_a_symmetry_of_the_second(arch, settings):
    build = tiny_neox if arch == "neox" else lambda seed=0: tiny(arch, seed=seed)
    a, b = _traced(with_gains(build()).eval()), _traced(with_gains(build(seed=1), seed=3).eval())
    ids = token_ids(n=8, length=16, seed=3)
    tr = get_matcher("symmetry", **settings).match(a, b, TokenSplit(ids, torch.ones_like(ids), "t"))
    assert _same_function(tr.apply(b), b, atol=1e-3)
    assert not _same_function(merge_aligned(a, b, tr), a, atol=1e-3)  # unrelated nets: the merge is neither
    assert tr.info["objective_matched"] > tr.info["objective_identity"]  # the alignment lines them up better


def test_partial_rotary_heads_take_rotation_scalings_on_their_pairs_and_any_map_on_the_rest():
    a = _traced(with_gains(tiny_phi()).eval())
    b = tiny_phi()
    b.load_state_dict(planted_phi_heads(a))
    b = _traced(b.eval())
    assert _same_function(a, b)
    tr = get_matcher("symmetry", symmetry="permutation", head_maps="all").match(a, b)
    aligned = tr.apply(b)
    for key, t in a.state_dict().items():
        assert torch.allclose(aligned.state_dict()[key], t, atol=1e-4), key
    assert _same_function(merge_aligned(a, b, tr), a)
