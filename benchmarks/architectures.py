"""The table of supported architectures: each `transformers` architecture built tiny from its config (random
init, no Hub), traced with `trace(model, inputs, on_unsupported="skip")` (the invariance check runs inside), and
what the spec permutes, keeps in place and skips, one row each.

    python benchmarks/architectures.py            # docs/ARCHITECTURES.md's table + benchmarks/results/architectures.json
    python benchmarks/architectures.py --only gpt2 phi --print   # a few rows, printed, nothing written

Every number in a row is deterministic (seeded init, seeded inputs); the trace time is in the JSON only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the table describes this checkout's tracer, not another installed copy

import hf_permerge  # noqa: E402, F401  (registers PermMLP / PermCNN)
from hf_permerge.alignment.tracing import check_permutation_invariance, trace  # noqa: E402
from hf_permerge.alignment.tracing.build import MIN_PERMUTED_SHARE, permuted_share  # noqa: E402
from hf_permerge.models import (  # noqa: E402
    PermCNNConfig,
    PermCNNForImageClassification,
    PermMLPConfig,
    PermMLPForImageClassification,
)

DOC = ROOT / "docs" / "ARCHITECTURES.md"
RESULTS = ROOT / "benchmarks" / "results" / "architectures.json"
BEGIN, END = "<!-- architectures:begin -->", "<!-- architectures:end -->"
COMMAND = "python benchmarks/architectures.py"

VOCAB, TOKENS, IMAGE = 97, 12, 32
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
DECODER = dict(TEXT, max_position_embeddings=64, num_key_value_heads=2, tie_word_embeddings=False)


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]


def text_inputs() -> dict:
    """Random tokens, the last row padded at its end, so the attention-mask path is traced too."""
    ids = torch.randint(3, VOCAB, (3, TOKENS), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def pixels(channels: int = 3, size: int = IMAGE) -> Callable[[], dict]:
    return lambda: {"pixel_values": torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))}


def _vit_like(cls, config_cls, **extra):
    return lambda: cls(
        config_cls(
            image_size=IMAGE,
            patch_size=8,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            num_labels=10,
            **extra,
        )
    )


ARCHS = [
    Arch(
        "GPT-2",
        lambda: T.GPT2LMHeadModel(
            T.GPT2Config(
                n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
            )
        ),
        text_inputs,
    ),
    Arch("LLaMA (GQA)", lambda: T.LlamaForCausalLM(T.LlamaConfig(**DECODER)), text_inputs),
    Arch(
        "LLaMA (MHA, tied embeddings)",
        lambda: T.LlamaForCausalLM(T.LlamaConfig(**{**DECODER, "num_key_value_heads": 4, "tie_word_embeddings": True})),
        text_inputs,
    ),
    Arch("Mistral", lambda: T.MistralForCausalLM(T.MistralConfig(**DECODER, sliding_window=8)), text_inputs),
    Arch("Qwen2", lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**DECODER)), text_inputs),
    Arch("Gemma", lambda: T.GemmaForCausalLM(T.GemmaConfig(**{**DECODER, "head_dim": 8})), text_inputs),
    Arch(
        "Phi",
        lambda: T.PhiForCausalLM(T.PhiConfig(**{**DECODER, "num_key_value_heads": 4}, partial_rotary_factor=0.5)),
        text_inputs,
    ),
    Arch(
        "GPT-NeoX (Pythia)",
        lambda: T.GPTNeoXForCausalLM(
            T.GPTNeoXConfig(
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                rotary_pct=0.5,
            )
        ),
        text_inputs,
    ),
    Arch("Phi-3", lambda: T.Phi3ForCausalLM(T.Phi3Config(**DECODER, pad_token_id=0)), text_inputs),
    Arch("Qwen3", lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**DECODER, head_dim=8)), text_inputs),
    Arch("Gemma2", lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**{**DECODER, "head_dim": 8})), text_inputs),
    Arch("Gemma3", lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**{**DECODER, "head_dim": 8})), text_inputs),
    Arch("OLMo-2", lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**DECODER)), text_inputs),
    Arch("StarCoder2", lambda: T.Starcoder2ForCausalLM(T.Starcoder2Config(**DECODER)), text_inputs),
    Arch(
        "StableLM", lambda: T.StableLmForCausalLM(T.StableLmConfig(**DECODER, partial_rotary_factor=0.5)), text_inputs
    ),
    Arch(
        "Gemma (MQA)",
        lambda: T.GemmaForCausalLM(T.GemmaConfig(**{**DECODER, "num_key_value_heads": 1, "head_dim": 8})),
        text_inputs,
    ),
    Arch(
        "OPT",
        lambda: T.OPTForCausalLM(
            T.OPTConfig(
                hidden_size=32,
                ffn_dim=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            )
        ),
        text_inputs,
    ),
    Arch(
        "GPT-J",
        lambda: T.GPTJForCausalLM(
            T.GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, rotary_dim=4)
        ),
        text_inputs,
    ),
    Arch(
        "Falcon (multi-query)",
        lambda: T.FalconForCausalLM(
            T.FalconConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, multi_query=True
            )
        ),
        text_inputs,
    ),
    Arch(
        "Bloom",
        lambda: T.BloomForCausalLM(T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB)),
        text_inputs,
    ),
    Arch(
        "Mixtral",
        lambda: T.MixtralForCausalLM(T.MixtralConfig(**DECODER, num_local_experts=4, num_experts_per_tok=2)),
        text_inputs,
    ),
    Arch(
        "Qwen2-MoE",
        lambda: T.Qwen2MoeForCausalLM(
            T.Qwen2MoeConfig(
                **DECODER,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
            )
        ),
        text_inputs,
    ),
    Arch(
        "T5",
        lambda: T.T5ForConditionalGeneration(
            T.T5Config(
                vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0
            )
        ),
        lambda: {**text_inputs(), "decoder_input_ids": text_inputs()["input_ids"][:, :8]},
    ),
    Arch(
        "BART",
        lambda: T.BartForConditionalGeneration(
            T.BartConfig(
                vocab_size=VOCAB,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=48,
                decoder_ffn_dim=48,
                max_position_embeddings=64,
            )
        ),
        lambda: {**text_inputs(), "decoder_input_ids": text_inputs()["input_ids"][:, :8]},
    ),
    Arch(
        "BERT",
        lambda: T.BertForMaskedLM(T.BertConfig(**TEXT, max_position_embeddings=64, type_vocab_size=2)),
        text_inputs,
    ),
    Arch(
        "RoBERTa",
        lambda: T.RobertaForMaskedLM(
            T.RobertaConfig(**TEXT, max_position_embeddings=64, type_vocab_size=1, pad_token_id=1)
        ),
        text_inputs,
    ),
    Arch(
        "DistilBERT",
        lambda: T.DistilBertForMaskedLM(
            T.DistilBertConfig(
                vocab_size=VOCAB, dim=32, hidden_dim=48, n_layers=2, n_heads=4, max_position_embeddings=64
            )
        ),
        text_inputs,
    ),
    Arch(
        "ELECTRA",
        lambda: T.ElectraForMaskedLM(T.ElectraConfig(**TEXT, embedding_size=32, max_position_embeddings=64)),
        text_inputs,
    ),
    Arch(
        "ALBERT",
        lambda: T.AlbertForMaskedLM(T.AlbertConfig(**TEXT, embedding_size=32, max_position_embeddings=64)),
        text_inputs,
    ),
    Arch(
        "XLM-RoBERTa",
        lambda: T.XLMRobertaForMaskedLM(
            T.XLMRobertaConfig(**TEXT, max_position_embeddings=64, type_vocab_size=1, pad_token_id=1)
        ),
        text_inputs,
    ),
    Arch(
        "ResNet",
        lambda: T.ResNetForImageClassification(
            T.ResNetConfig(
                embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck", num_labels=10
            )
        ),
        pixels(),
    ),
    Arch("ViT", _vit_like(T.ViTForImageClassification, T.ViTConfig), pixels()),
    Arch("DeiT", _vit_like(T.DeiTForImageClassification, T.DeiTConfig), pixels()),
    Arch("BEiT", _vit_like(T.BeitForImageClassification, T.BeitConfig), pixels()),
    Arch(
        "DINOv2",
        lambda: T.Dinov2ForImageClassification(
            T.Dinov2Config(
                image_size=IMAGE,
                patch_size=8,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                mlp_ratio=2,
                num_labels=10,
            )
        ),
        pixels(),
    ),
    Arch(
        "ConvNeXt",
        lambda: T.ConvNextForImageClassification(
            T.ConvNextConfig(
                num_stages=2,
                hidden_sizes=[8, 16],
                depths=[1, 1],
                patch_size=2,
                num_labels=10,
                layer_scale_init_value=0.5,
            )
        ),
        pixels(),
    ),
    Arch(
        "MobileNetV2",
        lambda: T.MobileNetV2ForImageClassification(
            T.MobileNetV2Config(image_size=IMAGE, depth_multiplier=0.25, num_labels=10)
        ),
        pixels(),
    ),
    Arch(
        "Swin",
        lambda: T.SwinForImageClassification(
            T.SwinConfig(
                image_size=IMAGE,
                patch_size=4,
                embed_dim=16,
                depths=[2, 1],
                num_heads=[2, 4],
                window_size=4,
                num_labels=10,
            )
        ),
        pixels(),
    ),
    Arch(
        "RegNet",
        lambda: T.RegNetForImageClassification(
            T.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, num_labels=10)
        ),
        pixels(),
    ),
    Arch(
        "PermMLP",
        lambda: PermMLPForImageClassification(PermMLPConfig(depth=2, width=32)),
        pixels(1, 28),
    ),
    Arch(
        "PermCNN",
        lambda: PermCNNForImageClassification(PermCNNConfig(layers="8-8-avg-16", batch_norm=True)),
        pixels(1, 28),
    ),
]


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of a trained net's scale (N(0, 1/fan-in)), not an init's 0.02; norm scales, biases, Swin's relative
    position tables, layer scales and running statistics off their constant inits. A tiny init keeps the net nearly
    linear and those tensors inert: the invariance check could then not see a group that breaks the function."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.parameters():
            if t.ndim >= 2:
                t.copy_(torch.randn(t.shape, generator=gen) / (t[0].numel() ** 0.5))
            else:
                t.add_(0.3 * torch.randn(t.shape, generator=gen))
        for name, t in model.named_buffers():
            if name.endswith("running_mean"):
                t.copy_(0.3 * torch.randn(t.shape, generator=gen))
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
    return model


def _pattern(group: str) -> str:
    """A group's name with its layer indices as '*', so a row names each kind of group once."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", group)


def _cause(reason: str) -> str:
    """A reason in a few words (the full one is in the JSON): the op, and what it does to the units."""
    causes = [
        ("grouped-query", "grouped-query values"),
        ("splits one layer's units into parts", "fused q/k/v split"),
        ("not in the state dict", "rotary frequencies"),
        ("takes part of a group's units", "part of the units sliced"),
        ("concatenates along a group's axis", "cat along the units"),
        ("randomly permuting it changes", "fails the invariance check"),
        ("mixes channels within groups", "grouped convolution"),
        ("reads its input channels in fixed groups", "input of a grouped convolution"),
        ("is not a permutation-equivariant op this tracer knows", "unknown op"),
        ("is used in a way this tracer cannot follow", "not followed"),
    ]
    op = re.match(r"(\S+) \(node ", reason)
    words = next((w for needle, w in causes if needle in reason), None)
    if words is None:  # the rule's own words, without the node and module
        return re.sub(r" \(node .*? in module '[^']*'\)", "", reason)
    module = re.search(r"in module '([^']*)'", reason)
    if words == "cat along the units" and module:  # where: rotate_half, or Swin's patch merging
        words += f" in `{_pattern(module.group(1))}`"
    return f"{op.group(1)}: {words}" if op and words in ("unknown op", "not followed") else words


def summarise(reasons: dict[str, str]) -> str:
    counts = Counter((_pattern(g), _cause(r)) for g, r in reasons.items())
    return "; ".join(f"`{p}`{f' ×{n}' if n > 1 else ''}: {c}" for (p, c), n in counts.items()) or "—"


def build(name: str) -> tuple[torch.nn.Module, dict]:
    """The row's model (seeded, randomised, eval mode) and its example inputs."""
    arch = next(a for a in ARCHS if a.name == name)
    torch.manual_seed(0)
    return randomise(arch.build()).eval(), arch.inputs()


def output_axis(modules: dict, key: str, t: torch.Tensor) -> int:
    """The axis of a parameter that carries its layer's output units: a Linear's or a convolution's rows, GPT-2's
    Conv1D's and an embedding's columns, a norm's or bias's only axis, the last axis of anything else (ViT's class
    token and position table)."""
    module = modules.get(key.rsplit(".", 1)[0])
    if t.ndim == 1:
        return 0
    if isinstance(module, (torch.nn.Embedding, T.pytorch_utils.Conv1D)):
        return 1
    if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
        return 0
    return t.ndim - 1


def output_unit_share(model: torch.nn.Module, spec) -> tuple[float, int]:
    """(share of hidden output units a group moves, how many there are): every parameter's output axis (see
    `output_axis`; tied tensors once), but the vocabulary's and the labels' (the model's own outputs, never
    permuted), counted in units, not entries. A fused projection counts the positions its parts move, so one
    whose outputs stay in place counts as unpermuted, whatever its input axis does."""
    cfg = getattr(model, "config", None)
    outputs = {getattr(cfg, "vocab_size", None), getattr(cfg, "num_labels", None) if hasattr(cfg, "id2label") else None}
    modules = dict(model.named_modules())
    seen, total, moved = set(), 0, 0
    for key, t in model.state_dict().items():
        if not t.is_floating_point() or (t.data_ptr(), tuple(t.shape)) in seen or not t.ndim:
            continue
        seen.add((t.data_ptr(), tuple(t.shape)))
        axis = output_axis(modules, key, t)
        if t.shape[axis] in outputs - {None}:
            continue
        total += t.shape[axis]
        entries = spec.layout.get(key, {}).get(axis, [])
        if any(part is None for _, part in entries):
            moved += t.shape[axis]
        else:
            moved += sum(spec[g].size * part.reps for g, part in entries)
    return (moved / total if total else 0.0), total


def planted_undone(name: str, model: torch.nn.Module, spec) -> str:
    """Whether weight matching merges a planted symmetry back to the model exactly: B = the model under a random
    element of its symmetry group, written by hand per layout in tests/text_models.py (never from the tracer).
    '—' for the rows no hand-written element exists for."""
    kind = PLANTED.get(name)
    if kind is None or not spec.groups:
        return "—"
    from hf_permerge.alignment.tracing import attach_permutation_spec
    from hf_permerge.alignment.weight import WeightMatcher

    sys.path.insert(0, str(ROOT / "tests"))
    from text_models import permuted_copy  # noqa: PLC0415

    other = permuted_copy(model)
    for m in (model, other):
        attach_permutation_spec(m, spec)
    aligned = WeightMatcher().match(model, other).apply(other).state_dict()
    same = all(torch.equal(aligned[k], t) for k, t in model.state_dict().items())
    return ("yes" if same else "no") + (f" ({kind})" if kind else "")


GQA_LEFT = ""
PLANTED = {  # row -> what the hand-written element leaves out ('' where it is the full group)
    "GPT-2": "",
    "BERT": "",
    "Gemma (MQA)": GQA_LEFT,
    "Qwen3": GQA_LEFT,
    "Phi-3": GQA_LEFT,
    "GPT-NeoX (Pythia)": "q/k units within a head beyond the rotary ones not planted: not yet aligned",
    "LLaMA (GQA)": GQA_LEFT,
    "LLaMA (MHA, tied embeddings)": "",
    "Mistral": GQA_LEFT,
    "Qwen2": GQA_LEFT,
}


def run_arch(arch: Arch) -> dict:
    model, inputs = build(arch.name)
    state = model.state_dict()
    row = {"architecture": arch.name, "class": type(model).__name__}
    row["parameters"] = sum(t.numel() for t in {(t.data_ptr(), t.shape): t for t in state.values()}.values())
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the coverage check warns with on_unsupported='skip'
        try:
            traced = trace(model, inputs, on_unsupported="skip")
        except Exception as err:  # export or the rules refuse: one line, the reason
            row.update(
                traced=False,
                refusal=(str(err).splitlines() or [type(err).__name__])[0],
                seconds=time.perf_counter() - start,
            )
            return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    spec = traced.spec
    share = permuted_share(spec, state)
    row["traced"] = bool(spec.groups) and share >= MIN_PERMUTED_SHARE
    if not spec.groups:
        row["refusal"] = "no permutation group"
    elif not row["traced"]:
        row["refusal"] = f"moves only {share:.0%} of the parameters (under {MIN_PERMUTED_SHARE:.0%})"
    row["warnings"] = [str(w.message) for w in caught]
    if spec.groups:  # trace() already checked it on these inputs; check again with other permutations
        check_permutation_invariance(model, spec, inputs, seed=1)
    row["invariance"] = bool(spec.groups)
    row["groups"] = len(spec.groups)
    row["head_groups"] = sum(g.blocks > 1 for g in spec.groups)
    row["rigid_groups"] = sum(g.rigid for g in spec.groups)
    row["couplings"] = len(spec.couplings)
    row["permuted_share"] = round(share, 4)
    row["output_unit_share"], row["output_units"] = output_unit_share(model, spec)
    row["output_unit_share"] = round(row["output_unit_share"], 4)
    row["planted"] = planted_undone(arch.name, model, spec)
    row["kept"] = dict(traced.kept)
    row["skipped"] = dict(traced.skipped)
    return row


def render(rows: list[dict]) -> str:
    lines = [
        BEGIN,
        "| Architecture | Class | Traced | Invariant | Groups (in blocks / rigid / couplings) | Output units permuted | "
        "Planted symmetry undone | Kept in place (why) | Skipped (why) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "groups" not in r:
            lines.append(
                f"| {r['architecture']} | `{r['class']}` | no: {_cell(r['refusal'])} | — | — | — | — | — | — |"
            )
            continue
        traced = "yes" if r["traced"] else f"no: {_cell(r.get('refusal', ''))}"
        lines.append(
            f"| {r['architecture']} | `{r['class']}` | {traced} | {'yes' if r['invariance'] else '—'} | "
            f"{r['groups']} ({r['head_groups']} / {r['rigid_groups']} / {r['couplings']}) | "
            f"{r['output_unit_share']:.0%} of {r['output_units']} | {_cell(r['planted'])} | "
            f"{_cell(summarise(r['kept']))} | {_cell(summarise(r['skipped']))} |"
        )
    lines.append(END)
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="row names (case-insensitive prefixes) to run")
    parser.add_argument("--print", action="store_true", help="print the table; write nothing")
    args = parser.parse_args()
    archs = [a for a in ARCHS if not args.only or any(a.name.lower().startswith(o.lower()) for o in args.only)]
    rows = []
    for arch in archs:
        rows.append(run_arch(arch))
        print(f"{arch.name}: {rows[-1].get('seconds', '?')} s", flush=True)
    table = render(rows)
    if args.print:
        print(table)
        for r in rows:
            print(json.dumps({k: r.get(k) for k in ("architecture", "refusal", "kept", "skipped")}, indent=1))
        return
    text = DOC.read_text()
    DOC.write_text(text[: text.index(BEGIN)] + table + text[text.index(END) + len(END) :])
    RESULTS.write_text(json.dumps({"torch": torch.__version__, "transformers": T.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
