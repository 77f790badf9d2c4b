"""The beyond-permutation tests' own planted class elements, written by hand per layout from each modeling file
(modeling_llama.py, modeling_gpt2.py, modeling_bert.py, modeling_phi.py): signs, folds and rotations of the residual
stream, and invertible maps per attention head; never taken from the tracer. Composed with text_models' planted
permutations."""

import torch
import transformers as T
from text_models import planted_permutation

READS = ("q_proj", "k_proj", "v_proj")  # input_layernorm's readers


READS_MLP = ("gate_proj", "up_proj")  # post_attention_layernorm's readers


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


def _rotation_scalings(n, w, gen, orthogonal=False):
    """Block-diagonal: per head of width w, [[a, -b], [b, a]] on each pair of units (u, u + w / 2); `orthogonal`:
    a rotation (a^2 + b^2 = 1)."""
    m = torch.zeros(n, n)
    for h in range(n // w):
        for u in range(w // 2):
            i, j = h * w + u, h * w + u + w // 2
            a, b = 0.5 + torch.rand(1, generator=gen).item(), torch.rand(1, generator=gen).item() - 0.5
            if orthogonal:
                a, b = a / (a * a + b * b) ** 0.5, b / (a * a + b * b) ** 0.5
            m[i, i], m[i, j], m[j, i], m[j, j] = a, -b, b, a
    return m


def _invertible(n, w, gen, orthogonal=False):
    """Block-diagonal: one random invertible map (identity plus noise, well conditioned) per head of width w;
    `orthogonal`: a random orthogonal one."""
    if orthogonal:
        return torch.block_diag(*[torch.linalg.qr(torch.randn(w, w, generator=gen))[0] for _ in range(n // w)])
    return torch.block_diag(*[torch.eye(w) + 0.3 * torch.randn(w, w, generator=gen) for _ in range(n // w)])


def planted_per_head(model, queries_keys=True, seed=1, orthogonal=False):
    """The hand-written permutations, then per head an invertible B on the values (the output projection's inputs by
    B^-T) and an invertible A on the queries (keys by A^-T), per layout: GPT-2's Conv1D stores (in, out) and c_attn's
    outputs are [q | k | v]; BERT's and LLaMA's Linear stores (out, in). Under LLaMA's rotary embedding (rotate_half
    pairs unit u of a head with u + head_dim / 2) A is a rotation-scaling [[a, -b], [b, a]] per pair; under
    grouped-query attention only the values are mapped, B per key/value head, on every query head that reads it."""
    return head_maps(planted_permutation(model, seed), model.config, queries_keys, seed, orthogonal)


def head_maps(sd, cfg, queries_keys=True, seed=1, orthogonal=False):
    """`planted_per_head`'s maps on a state dict of `cfg`'s layout (`orthogonal`: orthogonal maps and rotations)."""
    gen = torch.Generator().manual_seed(seed + 300)
    sd = dict(sd)
    d, w = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        a, b = _invertible(d, w, gen, orthogonal), _invertible(d, w, gen, orthogonal)
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
            kv = cfg.num_key_value_heads
            if kv != cfg.num_attention_heads:  # grouped-query (repeat_kv): query head h reads value head h // group
                value_maps = [_invertible(w, w, gen, orthogonal) for _ in range(kv)]
                group = cfg.num_attention_heads // kv
                b = torch.block_diag(*value_maps)
                sd[f"{base}.v_proj.weight"] = b @ sd[f"{base}.v_proj.weight"]
                reads = torch.block_diag(*[torch.linalg.inv(value_maps[h // group]) for h in range(d // w)])
                sd[f"{base}.o_proj.weight"] = sd[f"{base}.o_proj.weight"] @ reads
                continue
            names = {"v_proj": b, **({"q_proj": _rotation_scalings(d, w, gen, orthogonal)} if queries_keys else {})}
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
