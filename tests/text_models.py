"""Tiny random text transformers built from `transformers` configs, and the tests' own planted permutations.

The planted permutations are written here by hand, tensor by tensor, from each architecture's modeling file
(not from a traced spec), so a test that recovers them checks the tracer against an independent account."""

from __future__ import annotations

import torch
import transformers as T

VOCAB, POSITIONS = 97, 32


def tiny(arch: str, seed: int = 0, **overrides):
    """A small random model of `arch`: gpt2, llama (grouped-query), llama_mha, llama_mqa, llama_tied, qwen2, qwen3,
    phi3, gpt_neox, bert."""
    torch.manual_seed(seed)
    # weights at a trained net's scale: with the default 0.02 a tiny model is nearly linear, and a wrong spec
    # would change its logits too little for the invariance check to see
    common = dict(vocab_size=VOCAB, max_position_embeddings=POSITIONS, initializer_range=0.2)
    llama = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, **common)
    if arch == "gpt2":
        cfg = T.GPT2Config(
            initializer_range=0.2,
            n_embd=32,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=POSITIONS,
            bos_token_id=0,
            eos_token_id=0,
            **overrides,
        )
        return T.GPT2LMHeadModel(cfg)
    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **llama, **overrides))
    if arch == "llama_mha":
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=4, tie_word_embeddings=False, **llama, **overrides))
    if arch == "llama_mqa":  # multi-query: one key/value head for every query head
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=1, tie_word_embeddings=False, **llama, **overrides))
    if arch == "llama_tied":
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **llama, **overrides))
    if arch == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **llama, **overrides))
    if arch == "qwen3":  # per-head q/k RMSNorm shared by every head
        return T.Qwen3ForCausalLM(
            T.Qwen3Config(num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, **llama, **overrides)
        )
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return T.Phi3ForCausalLM(T.Phi3Config(num_key_value_heads=2, pad_token_id=0, **llama, **overrides))
    if arch == "gpt_neox":  # per-head interleaved query_key_value, partial rotary
        cfg = T.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            rotary_pct=0.5,
            **common,
            **overrides,
        )
        return T.GPTNeoXForCausalLM(cfg)
    if arch == "bert":
        cfg = T.BertConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            type_vocab_size=2,
            **common,
            **overrides,
        )
        return T.BertForMaskedLM(cfg)
    raise ValueError(arch)


def token_ids(n: int = 3, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _rand(n: int, gen) -> torch.Tensor:
    return torch.randperm(n, generator=gen)


def planted_permutation(model, seed: int = 1) -> dict[str, torch.Tensor]:
    """A permuted copy of `model`'s state dict: the residual stream, every MLP's hidden units and the attention
    heads (GPT-2, BERT: whole heads, q/k units and value units within each head; LLaMA-style: whole heads, a
    key/value head with its query heads) moved by random permutations, written per architecture by hand."""
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = model.config
    if cfg.model_type == "gpt_neox":
        return _planted_neox(sd, cfg, gen)
    d = cfg.hidden_size
    r = _rand(d, gen)  # the residual stream

    def rows(key, p):
        sd[key] = sd[key][p]

    def cols(key, p):
        sd[key] = sd[key][:, p]

    for key in list(sd):
        t = sd[key]
        if not t.is_floating_point():
            continue
        name = key.rsplit(".", 1)[0]
        is_gpt2 = cfg.model_type == "gpt2"
        if key.endswith(
            (
                "wte.weight",
                "wpe.weight",
                "embed_tokens.weight",
                "word_embeddings.weight",
                "position_embeddings.weight",
                "token_type_embeddings.weight",
                "lm_head.weight",
                "decoder.weight",
            )
        ):
            cols(key, r)
        elif t.ndim == 1 and t.shape[0] == d and ("norm" in name.lower() or "ln_" in name or "LayerNorm" in name):
            rows(key, r)
        elif is_gpt2 and t.ndim == 2 and name.endswith(("c_attn", "c_fc")):
            rows(key, r)  # Conv1D weights are (in, out)
        elif is_gpt2 and name.endswith("c_proj") and t.shape[-1] == d:
            sd[key] = t[..., r]
        elif t.ndim == 2 and name.endswith(
            (
                "q_proj",
                "k_proj",
                "v_proj",
                "qkv_proj",
                "gate_proj",
                "up_proj",
                "gate_up_proj",
                ".query",
                ".key",
                ".value",
                "intermediate.dense",
            )
        ):
            cols(key, r)
        elif name.endswith(("o_proj", "down_proj", "attention.output.dense", "output.dense")) and t.shape[0] == d:
            rows(key, r)
        elif name.endswith("transform.dense"):
            sd[key] = t[r][:, r] if t.ndim == 2 else t[r]
    for i in range(cfg.num_hidden_layers):  # MLP hidden units
        if cfg.model_type == "gpt2":
            p = _rand(sd[f"transformer.h.{i}.mlp.c_fc.weight"].shape[1], gen)
            cols(f"transformer.h.{i}.mlp.c_fc.weight", p)
            rows(f"transformer.h.{i}.mlp.c_fc.bias", p)
            rows(f"transformer.h.{i}.mlp.c_proj.weight", p)
            # attention (modeling_gpt2.py): c_attn's outputs are [q | k | v], each split into heads; whole heads move
            # alike in all three, q and k units jointly within each head, v units within each head on their own
            qk, v = _heads_and_units(cfg.n_head, d // cfg.n_head, gen)
            base = f"transformer.h.{i}.attn"
            fused = torch.cat([qk, d + qk, 2 * d + v])
            cols(f"{base}.c_attn.weight", fused)  # Conv1D: (in, out)
            rows(f"{base}.c_attn.bias", fused)
            rows(f"{base}.c_proj.weight", v)
        elif cfg.model_type == "bert":
            base = f"bert.encoder.layer.{i}"
            p = _rand(cfg.intermediate_size, gen)
            rows(f"{base}.intermediate.dense.weight", p)
            rows(f"{base}.intermediate.dense.bias", p)
            cols(f"{base}.output.dense.weight", p)
            qk, v = _heads_and_units(cfg.num_attention_heads, d // cfg.num_attention_heads, gen)
            for name, perm in (("query", qk), ("key", qk), ("value", v)):
                rows(f"{base}.attention.self.{name}.weight", perm)
                rows(f"{base}.attention.self.{name}.bias", perm)
            cols(f"{base}.attention.output.dense.weight", v)
        else:
            base = f"model.layers.{i}.mlp"
            p = _rand(cfg.intermediate_size, gen)
            if f"{base}.gate_up_proj.weight" in sd:  # Phi-3: rows [gate | up], one permutation for both halves
                rows(f"{base}.gate_up_proj.weight", torch.cat([p, cfg.intermediate_size + p]))
            else:
                rows(f"{base}.gate_proj.weight", p)
                rows(f"{base}.up_proj.weight", p)
            cols(f"{base}.down_proj.weight", p)
            _move_rotary_heads(sd, cfg, f"model.layers.{i}.self_attn", gen)
    return sd


def _heads_and_units(heads: int, width: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention layer without rotary embeddings: whole heads moved by one permutation (alike for queries, keys
    and values), and within each head the q/k units by one permutation (queries and keys alike: their dot product
    is unchanged) and the value units by another. Returns the (query/key, value) index over heads x width."""
    sigma = _rand(heads, gen)
    qk = torch.cat([int(s) * width + _rand(width, gen) for s in sigma])
    v = torch.cat([int(s) * width + _rand(width, gen) for s in sigma])
    return qk, v


def _planted_neox(sd, cfg, gen) -> dict:
    """GPT-NeoX (modeling_gpt_neox.py): `query_key_value` rows are per head [q_h | k_h | v_h] (interleaved), partial
    rotary on the first `rotary_pct` of each head's q/k units. Moved: the residual stream (embed_in, lm_head, every
    LayerNorm, every projection's input, the dense / MLP outputs), each MLP's units, whole heads (q, k, v of a head
    together, and `attention.dense`'s inputs) and the value units within each head. Not moved: q/k units within a head
    (the rotary ones are paired by position; the others could move, which the tracer does not yet do)."""
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    width = d // heads
    r = _rand(d, gen)
    for key in sd:
        if key.endswith(("embed_in.weight", "lm_head.weight", "query_key_value.weight", "dense_h_to_4h.weight")):
            sd[key] = sd[key][:, r]
        elif (
            "layernorm" in key
            or "final_layer_norm" in key
            or key.endswith(("attention.dense.bias", "dense_4h_to_h.bias"))
        ):
            sd[key] = sd[key][r]
        elif key.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
            sd[key] = sd[key][r]
    for i in range(cfg.num_hidden_layers):
        base = f"gpt_neox.layers.{i}"
        p = _rand(cfg.intermediate_size, gen)
        sd[f"{base}.mlp.dense_h_to_4h.weight"] = sd[f"{base}.mlp.dense_h_to_4h.weight"][p]
        sd[f"{base}.mlp.dense_h_to_4h.bias"] = sd[f"{base}.mlp.dense_h_to_4h.bias"][p]
        sd[f"{base}.mlp.dense_4h_to_h.weight"] = sd[f"{base}.mlp.dense_4h_to_h.weight"][:, p]
        sigma = _rand(heads, gen)
        values = [_rand(width, gen) for _ in range(heads)]
        rows = torch.cat(  # slot h takes head sigma[h]: its q and k rows in order, its v rows permuted within
            [
                torch.cat([3 * width * int(s) + torch.arange(2 * width), 3 * width * int(s) + 2 * width + v])
                for s, v in zip(sigma, values)
            ]
        )
        for kind in ("weight", "bias"):
            key = f"{base}.attention.query_key_value.{kind}"
            sd[key] = sd[key][rows]
        dense_in = torch.cat([width * int(s) + v for s, v in zip(sigma, values)])
        sd[f"{base}.attention.dense.weight"] = sd[f"{base}.attention.dense.weight"][:, dense_in]
    return sd


def _move_rotary_heads(sd, cfg, base, gen) -> None:
    """Whole heads of a rotary attention layer, from `modeling_llama.py`: key/value head j moves to slot i with its
    `heads / kv_heads` consecutive query heads (`repeat_kv`), which permute among themselves, and their output
    projection's columns; query and key units keep their order inside each head (rotary pairs unit u with
    u + head_dim / 2); a key/value head's value units move within it, alike on the output-projection columns of
    every query head that reads it."""
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    width = cfg.hidden_size // heads
    group = heads // kv_heads  # query heads per key/value head
    sigma = _rand(kv_heads, gen)  # slot i takes key/value head sigma[i]
    taus = [_rand(group, gen) for _ in sigma]  # ... and its query heads in the order tau
    units = [_rand(width, gen) for _ in sigma]  # ... and its value units in this order
    query = torch.cat(
        [(int(s) * group + int(t)) * width + torch.arange(width) for s, ts in zip(sigma, taus) for t in ts]
    )
    key = torch.cat([int(s) * width + torch.arange(width) for s in sigma])
    value = torch.cat([int(s) * width + u for s, u in zip(sigma, units)])
    # o_proj's inputs: query head (s, t)'s outputs, which are its key/value head's values: in their new order
    output = torch.cat([(int(s) * group + int(t)) * width + u for s, ts, u in zip(sigma, taus, units) for t in ts])
    if f"{base}.qkv_proj.weight" in sd:  # Phi-3 (modeling_phi3.py): one projection, rows [q | k | v]
        q, kv = heads * width, kv_heads * width
        sd[f"{base}.qkv_proj.weight"] = sd[f"{base}.qkv_proj.weight"][torch.cat([query, q + key, q + kv + value])]
    for name, p in (("q_proj", query), ("k_proj", key), ("v_proj", value)):
        for kind in ("weight", "bias"):
            if f"{base}.{name}.{kind}" in sd:
                sd[f"{base}.{name}.{kind}"] = sd[f"{base}.{name}.{kind}"][p]
    sd[f"{base}.o_proj.weight"] = sd[f"{base}.o_proj.weight"][:, output]


def permuted_copy(model, seed: int = 1):
    """A new model of the same class and config holding `planted_permutation(model)`: the same function."""
    other = type(model)(model.config)
    other.load_state_dict(planted_permutation(model, seed))
    return other.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits
