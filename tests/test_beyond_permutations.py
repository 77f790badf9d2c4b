"""Symmetries beyond permutations: signed permutations and orthogonal maps of an RMSNorm residual stream.

Each planted element is written here by hand for the LLaMA layout (modeling_llama.py: every writer and reader of the
stream, the SwiGLU units), composed with text_models' hand-written permutations; never taken from the tracer."""

import pytest
import torch
import transformers as T
from text_models import logits, planted_permutation, tiny, token_ids

from hf_permerge.alignment import WeightMatcher, get_matcher
from hf_permerge.alignment.tracing import attach_permutation_spec, trace
from hf_permerge.alignment.transforms import load_transforms, merge_aligned, merge_all, save_transforms
from hf_permerge.data.tokens import TokenSplit

RMS = ["llama", "llama_mha", "qwen2"]
READS = ("q_proj", "k_proj", "v_proj")  # input_layernorm's readers
READS_MLP = ("gate_proj", "up_proj")  # post_attention_layernorm's readers


def _traced(model):
    attach_permutation_spec(model, trace(model, {"input_ids": token_ids()}).spec)
    return model


def _model(arch, sd):
    """A model of `arch` holding `sd`, its spec traced (the tracer sees shapes only: any weights do)."""
    m = tiny(arch)
    m.load_state_dict(sd)
    return _traced(m.eval())


def _stream_map(sd, cfg, rows, cols):
    """Every writer's stream axis by `rows` (a function of a tensor's stream rows), every reader's by `cols`."""
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[key] = cols(sd[key])
    for i in range(cfg.num_hidden_layers):
        base = f"model.layers.{i}"
        for name in READS:
            sd[f"{base}.self_attn.{name}.weight"] = cols(sd[f"{base}.self_attn.{name}.weight"])
        for name in READS_MLP:
            sd[f"{base}.mlp.{name}.weight"] = cols(sd[f"{base}.mlp.{name}.weight"])
        sd[f"{base}.self_attn.o_proj.weight"] = rows(sd[f"{base}.self_attn.o_proj.weight"])
        sd[f"{base}.mlp.down_proj.weight"] = rows(sd[f"{base}.mlp.down_proj.weight"])
    return sd


def planted_signed(model, seed=1):
    """The hand-written permutations, then a random sign per stream coordinate (norm gains kept) and per SwiGLU up
    unit (up_proj row and down_proj column; gate_proj untouched)."""
    gen = torch.Generator().manual_seed(seed + 100)
    cfg = model.config
    sd = planted_permutation(model, seed)
    s = torch.randint(0, 2, (cfg.hidden_size,), generator=gen) * 2.0 - 1
    sd = _stream_map(sd, cfg, lambda w: s[:, None] * w, lambda w: w * s)
    for i in range(cfg.num_hidden_layers):
        u = torch.randint(0, 2, (cfg.intermediate_size,), generator=gen) * 2.0 - 1
        sd[f"model.layers.{i}.mlp.up_proj.weight"] *= u[:, None]
        sd[f"model.layers.{i}.mlp.down_proj.weight"] *= u
    return sd


def with_gains(model, seed=2, final=True):
    """`model` with random positive norm gains and random biases (a trained net's are not 1 and 0);
    `final=False` keeps model.norm's gain 1."""
    gen = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for key, t in sd.items():
        norm = "norm" in key.lower() or "ln_" in key
        if key.endswith(".weight") and norm and (final or key != "model.norm.weight"):
            sd[key] = 0.5 + torch.rand(t.shape, generator=gen)
        elif key.endswith(".bias"):
            sd[key] = 0.3 * torch.randn(t.shape, generator=gen)
    model.load_state_dict(sd)
    return model


def folded(sd, cfg):
    """Each RMSNorm gain folded by hand into the columns of the layers that read it, the gain set to 1."""
    sd = dict(sd)
    for i in range(cfg.num_hidden_layers):
        base = f"model.layers.{i}"
        for norm, reads in (("input_layernorm", READS), ("post_attention_layernorm", READS_MLP)):
            gain = sd[f"{base}.{norm}.weight"]
            for name in reads:
                sub = "self_attn" if name in READS else "mlp"
                sd[f"{base}.{sub}.{name}.weight"] = sd[f"{base}.{sub}.{name}.weight"] * gain
            sd[f"{base}.{norm}.weight"] = torch.ones_like(gain)
    sd["lm_head.weight"] = sd["lm_head.weight"] * sd["model.norm.weight"]
    sd["model.norm.weight"] = torch.ones_like(sd["model.norm.weight"])
    return sd


def planted_orthogonal(model, seed=1):
    """The gains folded, the hand-written permutations, then a random orthogonal Q of the stream: writers Q W,
    readers W Q^T (the embedding's rows e -> Q e)."""
    gen = torch.Generator().manual_seed(seed + 200)
    cfg = model.config
    base = type(model)(cfg)
    base.load_state_dict(folded(model.state_dict(), cfg))
    q, r = torch.linalg.qr(torch.randn(cfg.hidden_size, cfg.hidden_size, generator=gen, dtype=torch.float64))
    q = (q * torch.sign(torch.diagonal(r))).float()
    return _stream_map(planted_permutation(base, seed), cfg, lambda w: q @ w, lambda w: w @ q.T)


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


def _rotation_scalings(n, w, gen):
    """Block-diagonal: per head of width w, [[a, -b], [b, a]] on each pair of units (u, u + w / 2)."""
    m = torch.zeros(n, n)
    for h in range(n // w):
        for u in range(w // 2):
            i, j = h * w + u, h * w + u + w // 2
            a, b = 0.5 + torch.rand(1, generator=gen).item(), torch.rand(1, generator=gen).item() - 0.5
            m[i, i], m[i, j], m[j, i], m[j, j] = a, -b, b, a
    return m


def _invertible(n, w, gen):
    """Block-diagonal: one random invertible map (identity plus noise, well conditioned) per head of width w."""
    return torch.block_diag(*[torch.eye(w) + 0.3 * torch.randn(w, w, generator=gen) for _ in range(n // w)])


def planted_per_head(model, queries_keys=True, seed=1):
    """The hand-written permutations, then per head an invertible B on the values (the output projection's inputs by
    B^-T) and an invertible A on the queries (keys by A^-T), per layout: GPT-2's Conv1D stores (in, out) and c_attn's
    outputs are [q | k | v]; BERT's and LLaMA's Linear stores (out, in). Under LLaMA's rotary embedding (rotate_half
    pairs unit u of a head with u + head_dim / 2) A is a rotation-scaling [[a, -b], [b, a]] per pair."""
    return head_maps(planted_permutation(model, seed), model.config, queries_keys, seed)


def head_maps(sd, cfg, queries_keys=True, seed=1):
    """`planted_per_head`'s maps on a state dict of `cfg`'s layout."""
    gen = torch.Generator().manual_seed(seed + 300)
    sd = dict(sd)
    d, w = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        a, b = _invertible(d, w, gen), _invertible(d, w, gen)
        a_inv_t, b_inv_t = torch.linalg.inv(a).T, torch.linalg.inv(b).T
        if cfg.model_type == "gpt2":
            base = f"transformer.h.{i}.attn"
            wt, bias = sd[f"{base}.c_attn.weight"].clone(), sd[f"{base}.c_attn.bias"].clone()
            wt[:, :d], wt[:, d : 2 * d], wt[:, 2 * d :] = (
                wt[:, :d] @ a.T,
                wt[:, d : 2 * d] @ a_inv_t.T,
                wt[:, 2 * d :] @ b.T,
            )
            bias[:d], bias[d : 2 * d], bias[2 * d :] = a @ bias[:d], a_inv_t @ bias[d : 2 * d], b @ bias[2 * d :]
            sd[f"{base}.c_attn.weight"], sd[f"{base}.c_attn.bias"] = wt, bias
            sd[f"{base}.c_proj.weight"] = b_inv_t @ sd[f"{base}.c_proj.weight"]
            continue
        if cfg.model_type == "bert":
            base = f"bert.encoder.layer.{i}.attention"
            names = {"query": a, "key": a_inv_t, "value": b}
            out = f"{base}.output.dense.weight"
        else:
            base = f"model.layers.{i}.self_attn"
            names = {"v_proj": b, **({"q_proj": _rotation_scalings(d, w, gen)} if queries_keys else {})}
            if queries_keys:
                names["k_proj"] = torch.linalg.inv(names["q_proj"]).T
            out = f"{base}.o_proj.weight"
        for name, m in names.items():
            for kind in ("weight", "bias"):
                key = f"{base}.self.{name}.{kind}" if cfg.model_type == "bert" else f"{base}.{name}.{kind}"
                if key in sd:
                    sd[key] = m @ sd[key]
        sd[out] = sd[out] @ torch.linalg.inv(b)
    return sd


@pytest.mark.parametrize(
    "arch, values_only, source",
    [
        ("gpt2", False, "weight"),
        ("bert", False, "weight"),
        ("llama_mha", False, "weight"),
        ("llama_mha", True, "weight"),
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


def test_per_head_query_key_maps_are_refused_where_grouped_query_heads_share_a_rotary_group():
    gqa = _traced(tiny("llama").eval())  # the values share their group with the keys, rigid under the rotary
    with pytest.raises(ValueError, match="refused: model.rotary_emb pins the query/key units of .*k_proj and no"):
        get_matcher("symmetry", symmetry="permutation", head_maps="all").match(gqa, gqa)
    with pytest.raises(ValueError, match="no attention group of LlamaForCausalLM takes per-head maps"):
        get_matcher("symmetry", symmetry="permutation", head_maps="values").match(gqa, gqa)


def tiny_phi():
    """Phi (modeling_phi.py): pre-LN LayerNorm blocks, attention and MLP side by side, an LM head with a bias."""
    torch.manual_seed(0)
    cfg = T.PhiConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        partial_rotary_factor=0.5,
        initializer_range=0.2,
    )
    return T.PhiForCausalLM(cfg)


def planted_phi_rotation(model, seed=1):
    """Phi's LayerNorms folded by hand (weight into the readers' columns, bias into their biases: W b + c), then a
    random orthogonal Q with Q1 = 1 on the stream: embeddings, attention dense and fc2 outputs (weights and biases)
    by Q, q/k/v, fc1 and lm_head inputs by Q^T."""
    gen = torch.Generator().manual_seed(seed + 400)
    cfg, sd = model.config, dict(model.state_dict())
    d = cfg.hidden_size
    norms = {
        f"model.layers.{i}.input_layernorm": [
            f"model.layers.{i}.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")
        ]
        for i in range(cfg.num_hidden_layers)
    }
    norms["model.final_layernorm"] = ["lm_head"]
    for norm, readers in norms.items():
        w, b = sd[f"{norm}.weight"], sd[f"{norm}.bias"]
        for r in readers:
            sd[f"{r}.bias"] = sd[f"{r}.bias"] + sd[f"{r}.weight"] @ b
            sd[f"{r}.weight"] = sd[f"{r}.weight"] * w
        sd[f"{norm}.weight"], sd[f"{norm}.bias"] = torch.ones(d), torch.zeros(d)
    basis = torch.linalg.qr(torch.cat([torch.ones(d, 1), torch.randn(d, d - 1, generator=gen)], 1))[0][:, 1:]
    r = torch.linalg.qr(torch.randn(d - 1, d - 1, generator=gen))[0]
    q = torch.full((d, d), 1.0 / d) + basis @ r @ basis.T
    assert torch.allclose(q @ torch.ones(d), torch.ones(d), atol=1e-5)
    folded_a = dict(sd)
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] @ q.T
    for key in list(sd):
        if key.endswith(("self_attn.dense.weight", "mlp.fc2.weight")):
            sd[key] = q @ sd[key]
        elif key.endswith(("self_attn.dense.bias", "mlp.fc2.bias")):
            sd[key] = q @ sd[key]
        elif key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "fc1.weight", "lm_head.weight")):
            sd[key] = sd[key] @ q.T
    return folded_a, sd


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
    ],
)
def test_what_is_found_for_two_unrelated_nets_is_a_symmetry_of_the_second(arch, settings):
    build = tiny_neox if arch == "neox" else lambda seed=0: tiny(arch, seed=seed)
    a, b = _traced(with_gains(build()).eval()), _traced(with_gains(build(seed=1), seed=3).eval())
    ids = token_ids(n=8, length=16, seed=3)
    tr = get_matcher("symmetry", **settings).match(a, b, TokenSplit(ids, torch.ones_like(ids), "t"))
    assert _same_function(tr.apply(b), b, atol=1e-3)
    assert not _same_function(merge_aligned(a, b, tr), a, atol=1e-3)  # unrelated nets: the merge is neither


def tiny_neox(seed=0):
    torch.manual_seed(seed)
    cfg = T.GPTNeoXConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=97,
        max_position_embeddings=32,
        rotary_pct=0.5,
        initializer_range=0.2,
    )
    return T.GPTNeoXForCausalLM(cfg)


def planted_phi_heads(model, seed=1):
    """Per head of Phi (modeling_phi.py, partial rotary: rotate_half on the first half of each head's units): queries
    by A, keys by A^-T, where A is a rotation-scaling on the rotary pairs (u, u + 2) of units 0-3 and any invertible
    map of units 4-7; values by B, the dense layer's inputs by B^-1 (weights and biases)."""
    gen = torch.Generator().manual_seed(seed + 500)
    cfg, sd = model.config, dict(model.state_dict())
    d, w = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        heads = []
        for _ in range(d // w):
            m = torch.zeros(w, w)
            for u in range(w // 4):
                a, b = 0.5 + torch.rand(1, generator=gen).item(), torch.rand(1, generator=gen).item() - 0.5
                m[u, u], m[u, u + w // 4], m[u + w // 4, u], m[u + w // 4, u + w // 4] = a, -b, b, a
            m[w // 2 :, w // 2 :] = torch.eye(w // 2) + 0.3 * torch.randn(w // 2, w // 2, generator=gen)
            heads.append(m)
        a_map, b_map = torch.block_diag(*heads), _invertible(d, w, gen)
        base = f"model.layers.{i}.self_attn"
        for name, m in (("q_proj", a_map), ("k_proj", torch.linalg.inv(a_map).T), ("v_proj", b_map)):
            for kind in ("weight", "bias"):
                sd[f"{base}.{name}.{kind}"] = m @ sd[f"{base}.{name}.{kind}"]
        sd[f"{base}.dense.weight"] = sd[f"{base}.dense.weight"] @ torch.linalg.inv(b_map)
    return sd


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
