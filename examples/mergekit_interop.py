"""Align with hf_permerge, merge with mergekit: both give the same permuted merge.

    python examples/mergekit_interop.py --mergekit /path/to/mergekit-venv/bin/mergekit-yaml
    python examples/mergekit_interop.py --models path/to/A path/to/B --work-dir runs/interop

`hf-permerge align A B --matcher weight --write-aligned B_ALIGNED` (or `PermMerger.save_aligned(1, B_ALIGNED)`)
writes B permuted onto A as an ordinary model folder: the same function as B, its units lined up with A's. Any
merging tool can then merge A with it. This script shows it end to end:

1. builds two tiny LLaMA-style causal LMs from two different random inits (or takes `--models A B`, two
   causal-LM folders of one architecture), saved with `save_pretrained`;
2. aligns B onto A by weight matching and writes the aligned B;
3. runs mergekit's linear merge (weight 0.5 each, float32) of A with the aligned B, and of A with the
   unaligned B;
4. compares both with hf_permerge's own merge, `merger.merge(0.5)`: per tensor kind the largest absolute
   difference of the weights, and the largest difference of the logits on a few token sequences.

mergekit on the aligned B must equal ours up to float32 rounding (the script exits 1 otherwise); on the
unaligned B it is the vanilla average, far from ours: that is what the alignment is for.

mergekit is not a dependency of hf_permerge; install it in a venv of its own, CPU torch first so that it pulls
no CUDA build (from the repository root):

    python3 -m venv mk && mk/bin/pip install -c constraints.txt torch==2.13.0
    mk/bin/pip install -c constraints.txt mergekit

and pass its `mergekit-yaml` with `--mergekit` (or env HF_PERMERGE_MERGEKIT; default: `mergekit-yaml` on PATH).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import transformers
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_permerge import PermMerger

VOCAB = 128
TOLERANCE = 1e-5
"""Largest difference allowed between mergekit's merge and ours, relative to the largest weight or logit: float32
rounding of the same average, computed in another order, stays far below it."""


def find_mergekit(path: str | None = None) -> str | None:
    """The `mergekit-yaml` to run: `path`, else env HF_PERMERGE_MERGEKIT, else the one on PATH (None if none)."""
    path = path or os.environ.get("HF_PERMERGE_MERGEKIT") or "mergekit-yaml"
    return shutil.which(path)


def tiny_llama(seed: int, hidden: int = 64, layers: int = 2):
    """A small random LLaMA-style causal LM with grouped-query attention (4 query heads, 2 key/value heads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.2,  # a trained net's scale: at the default 0.02 a tiny model is nearly linear
    )
    return LlamaForCausalLM(config).eval()


def word_tokenizer():
    """A word-level tokenizer for the tiny models' vocabulary (`w0 w1 ...`), so each folder is a whole model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


def build_pair(folder: Path, hidden: int = 64, layers: int = 2) -> tuple[Path, Path]:
    """Two tiny LLaMAs from different random inits (seeds 0 and 1), saved as HF folders `folder`/A and B."""
    paths = folder / "A", folder / "B"
    for seed, path in enumerate(paths):
        tiny_llama(seed, hidden, layers).save_pretrained(path)
        word_tokenizer().save_pretrained(path)
    return paths


def mergekit_linear(mergekit: str, models: list[Path], out: Path, out_dtype: str = "float32") -> Path:
    """mergekit's linear merge of `models`, weight 0.5 each, computed in float32 on the CPU and written to `out`
    in `out_dtype` (hf_permerge too averages in float32 and keeps the models' dtype)."""
    out.mkdir(parents=True, exist_ok=True)
    config = out.parent / f"{out.name}.yaml"
    recipe = {
        "merge_method": "linear",
        "dtype": "float32",
        "out_dtype": out_dtype,
        "models": [{"model": str(m.resolve()), "parameters": {"weight": 0.5}} for m in models],
    }
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [mergekit, str(config), str(out), "--no-cuda", "--no-write-model-card", "--quiet"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return out


def kind(key: str) -> str:
    """The kind of a state-dict tensor, its layer index dropped: `model.layers.1.mlp.up_proj.weight` -> `mlp.up_proj`."""
    name = re.sub(r"^model\.", "", key.removesuffix(".weight").removesuffix(".bias"))
    return re.sub(r"^layers\.\d+\.", "", name)


def compare(ours, theirs, ids: torch.Tensor) -> dict:
    """Per tensor kind the largest |ours - theirs| of the weights, and of the logits on `ids`."""
    mine, other = ours.state_dict(), theirs.state_dict()
    if set(mine) != set(other):
        raise ValueError(f"the two merges hold different tensors: {sorted(set(mine) ^ set(other))}")
    weights: dict[str, float] = {}
    for key, t in mine.items():
        diff = (t.float() - other[key].float()).abs().max().item()
        weights[kind(key)] = max(weights.get(kind(key), 0.0), diff)
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    return {
        "weights": weights,
        "logits": (a - b).abs().max().item(),
        "weight_scale": max(t.abs().max().item() for t in mine.values()),
        "logit_scale": a.abs().max().item(),
    }


def agrees(diff: dict, tolerance: float = TOLERANCE) -> bool:
    """Whether two merges are the same up to float32 rounding (`tolerance` relative to the largest value)."""
    return (
        max(diff["weights"].values()) <= tolerance * diff["weight_scale"]
        and diff["logits"] <= tolerance * diff["logit_scale"]
    )


def interop(a: Path, b: Path, work_dir: Path, mergekit: str) -> dict:
    """Align B onto A, write the aligned B, merge A with it (and with the unaligned B) by mergekit, and compare
    each with hf_permerge's own merge at alpha 0.5. Returns {"aligned": diff, "unaligned": diff} (see `compare`)."""
    work_dir = Path(work_dir)
    merger = PermMerger.from_pretrained([str(a), str(b)])
    merger.align(matcher="weight")
    aligned = merger.save_aligned(1, work_dir / "B_aligned", overwrite=True)
    ours = merger.merge(0.5).eval()
    dtype = str(ours.dtype).removeprefix("torch.")
    ids = torch.randint(0, ours.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    others = {"aligned": aligned, "unaligned": Path(b)}

    def with_a(name: str) -> Path:
        return mergekit_linear(mergekit, [Path(a), others[name]], work_dir / f"mergekit_{name}", dtype)

    with ThreadPoolExecutor(len(others)) as pool:  # two mergekit processes at once: most of each is its start-up
        outs = list(pool.map(with_a, others))
    report = {}
    for name, out in zip(others, outs):
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=ours.dtype).eval()
        report[name] = compare(ours, theirs, ids)
    return report


def show(report: dict) -> None:
    """The table of `interop`'s report: mergekit on the aligned and on the unaligned B, each against ours."""
    kinds = list(report["aligned"]["weights"])
    width = max(map(len, kinds))
    print(
        f"max |ours - mergekit| per tensor kind (ours: hf_permerge merge(0.5))\n{'':{width}}  {'aligned B':>12}  "
        f"{'unaligned B':>12}"
    )
    for k in kinds:
        print(f"{k:{width}}  {report['aligned']['weights'][k]:12.3e}  {report['unaligned']['weights'][k]:12.3e}")
    print(f"{'logits':{width}}  {report['aligned']['logits']:12.3e}  {report['unaligned']['logits']:12.3e}")
    print(
        f"(largest weight {report['aligned']['weight_scale']:.3g}, largest logit {report['aligned']['logit_scale']:.3g})"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        nargs=2,
        metavar=("A", "B"),
        help="two causal-LM folders of one architecture (default: build two tiny random LLaMAs in --work-dir)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("runs/mergekit_interop"),
        help="where the models, the aligned B, the mergekit configs and merges go",
    )
    parser.add_argument(
        "--mergekit",
        help="the mergekit-yaml executable (default: env HF_PERMERGE_MERGEKIT, else mergekit-yaml on PATH)",
    )
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    mergekit = find_mergekit(args.mergekit)
    if mergekit is None:
        parser.error(
            "no mergekit-yaml found: install mergekit in a venv of its own (docs/GUIDE.md, 'Merging with "
            "mergekit') and pass --mergekit mk/bin/mergekit-yaml"
        )
    a, b = map(Path, args.models) if args.models else build_pair(args.work_dir)
    report = interop(a, b, args.work_dir, mergekit)
    show(report)
    if not agrees(report["aligned"]):
        print("mergekit's linear merge of A and the aligned B differs from ours beyond float32 rounding")
        return 1
    print(
        "mergekit's linear merge of A and the aligned B equals ours up to float32 rounding; "
        "with the unaligned B it is the vanilla average, not ours"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
