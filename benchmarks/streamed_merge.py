"""Align (weight matching to convergence) + merge + save two TinyLlama-1.1B-shaped checkpoints, streamed from disk,
against a plain in-memory implementation and the I/O floor, in one run (BENCHMARKS.md, "Streamed merging").

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/streamed_merge.py --layers 22 --work /tmp/bench
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/streamed_merge.py --layers 4 --reference --work /tmp/bench
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/streamed_merge.py --layers 22 --jobs activation --work /tmp/bench

The pair: A random (bf16, hidden 2048, MLP 5632, 32 heads, 4 key/value heads, vocabulary 32000), B a planted
permutation of A (the residual stream and every MLP's units, permuted here by name, not by the tracer's spec),
both written tensor by tensor into 500 MB shards (nothing is ever held whole). The merge of A and B must be A.

Each job runs in its own process (one torch thread); this process samples its RssAnon (anonymous memory: file
pages of the memory-mapped shards excluded) from /proc every 20 ms and keeps the peak:
- streamed: `merge_streamed` (trace a two-layer copy, weight matching streamed from the shards, merge, save);
- activation (`--jobs activation`): `merge_streamed(matcher="activation")` on 4 x 256 random tokens, both models
  read layer by layer from their shards, statistics in passes of at most 4096 MiB, merge, save;
- reference: both state dicts loaded in float32, Git Re-Basin's coordinate descent (from the identity, random
  group order, until a pass improves nothing), the merge in float32, one safetensors file written in bf16;
- floor: read both, average, write (a linear merge, streamed): the cost of merely moving the bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's hf_permerge, also in the jobs' processes
RESULTS = ROOT / "benchmarks" / "results" / "streamed-merge"
TINYLLAMA = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    architectures=["LlamaForCausalLM"],
)


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **TINYLLAMA)


def planted(name: str, t, stream, mlp):
    """B's tensor `name`: A's, with the residual stream permuted by `stream` and layer i's MLP units by `mlp[i]`."""
    layer = int(name.split(".")[2]) if ".layers." in name else None
    if name.endswith(("embed_tokens.weight", "lm_head.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight")):
        t = t[:, stream]
    elif name.endswith("norm.weight"):
        t = t[stream]
    elif name.endswith("o_proj.weight"):
        t = t[stream]
    elif name.endswith(("gate_proj.weight", "up_proj.weight")):
        t = t[mlp[layer]][:, stream]
    elif name.endswith("down_proj.weight"):
        t = t[stream][:, mlp[layer]]
    return t.contiguous()


def build_pair(root: Path, layers: int, seed: int = 0, max_shard_size: str = "500MB") -> tuple[Path, Path]:
    """Folders a and b, written tensor by tensor from a meta-device model's names and shapes."""
    import torch
    from transformers import LlamaForCausalLM

    from hf_permerge.shards import ShardWriter

    a, b = root / f"a-{layers}", root / f"b-{layers}"
    if (a / "config.json").is_file() and (b / "config.json").is_file():
        return a, b
    cfg = llama_config(layers)
    with torch.device("meta"):
        layout = {k: (tuple(v.shape), torch.bfloat16) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    stream = torch.randperm(cfg.hidden_size, generator=gen)
    mlp = [torch.randperm(cfg.intermediate_size, generator=gen) for _ in range(layers)]
    for folder in (a, b):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    with ShardWriter(a, layout, max_shard_size) as wa, ShardWriter(b, layout, max_shard_size) as wb:
        for i, (name, (shape, _)) in enumerate(layout.items()):
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            t = torch.randn(shape, generator=g)
            t = (t * 0.02 if len(shape) == 2 else 1 + 0.1 * t).to(torch.bfloat16)
            wa.write(name, t)
            wb.write(name, planted(name, t, stream, mlp))
    for folder in (a, b):
        cfg.save_pretrained(folder)
    return a, b


# -- the jobs, each in its own process ---------------------------------------------------------------------


def job_streamed(a, b, out) -> dict:
    from hf_permerge.merging.streamed import merge_streamed

    merge_streamed(a, b, out, max_shard_size="500MB", progress=False)
    return json.loads((Path(out) / "merge_config.json").read_text())["timings_s"]


ACTIVATION = {"sequences": 4, "length": 256, "max_statistics_mb": 4096}
"""The activation job's token stream (random ids: the planted pair's units agree on any input) and bound."""


def job_activation(a, b, out) -> dict:
    import torch

    from hf_permerge.data.tokens import TokenSplit
    from hf_permerge.merging.streamed import merge_streamed

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINYLLAMA["vocab_size"], (ACTIVATION["sequences"], ACTIVATION["length"]), generator=gen)
    data = TokenSplit(ids, torch.ones_like(ids), "random-tokens")
    merge_streamed(
        a,
        b,
        out,
        max_shard_size="500MB",
        progress=False,
        matcher="activation",
        data=data,
        max_statistics_mb=ACTIVATION["max_statistics_mb"],
    )
    return json.loads((Path(out) / "merge_config.json").read_text())["timings_s"]


def job_floor(a, b, out) -> dict:
    import torch

    from hf_permerge.shards import ShardedTensors, ShardWriter

    sa, sb = ShardedTensors(a), ShardedTensors(b)
    Path(out).mkdir(parents=True)
    with ShardWriter(out, {n: sa.meta(n) for n in sa}, "500MB") as w:
        for n in sa:
            w.write(n, torch.lerp(sa[n].float(), sb[n].float(), 0.5).to(sa.meta(n)[1]))
    shutil.copy2(Path(a) / "config.json", Path(out) / "config.json")
    return {}


def rebasin(spec, params_a, params_b, max_iter: int = 100, seed: int = 0):
    """Git Re-Basin's `weight_matching` (samuela/git-re-basin), in torch: float32, from the identity."""
    import torch
    from scipy.optimize import linear_sum_assignment

    from hf_permerge.alignment.spec import permute_tensor

    perms = {g.name: torch.arange(g.size) for g in spec.groups}
    gen = torch.Generator().manual_seed(seed)
    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        progress = False
        for i in torch.randperm(len(spec.groups), generator=gen):
            g = spec.groups[int(i)]
            sim = torch.zeros(g.size, g.size)
            for key, axis in g.axes:
                w_a = params_a[key].movedim(axis, 0).reshape(g.size, -1)
                w_b = permute_tensor(spec, key, params_b[key], perms, except_axis=axis).movedim(axis, 0)
                sim += w_a @ w_b.reshape(g.size, -1).T
            _, cols = linear_sum_assignment(sim.numpy(), maximize=True)
            idx = torch.arange(g.size)
            old, new = float(sim[idx, perms[g.name]].sum()), float(sim[idx, torch.from_numpy(cols)].sum())
            progress = progress or new > old + 1e-12 * abs(old)
            perms[g.name] = torch.from_numpy(cols).long()
        if not progress:
            break
    return perms, sweeps


def job_reference(a, b, out) -> dict:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from hf_permerge.alignment.spec import apply_permutations
    from hf_permerge.merging.checkpoint_spec import checkpoint_spec
    from hf_permerge.shards import INDEX_NAME, WEIGHTS_NAME

    def load(folder):
        folder = Path(folder)
        index = folder / INDEX_NAME
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS_NAME]
        state = {}
        for f in files:
            state.update({k: v.float() for k, v in load_file(folder / f).items()})
        return state

    start = time.perf_counter()
    params_a, params_b = load(a), load(b)
    spec, _ = checkpoint_spec(AutoConfig.from_pretrained(a), params_a)
    loaded = time.perf_counter()
    perms, sweeps = rebasin(spec, params_a, params_b)
    aligned = time.perf_counter()
    permuted = apply_permutations(spec, params_b, perms)
    del params_b
    merged = {k: torch.lerp(params_a[k], permuted[k], 0.5).to(torch.bfloat16) for k in params_a}
    Path(out).mkdir(parents=True)
    save_file(merged, str(Path(out) / WEIGHTS_NAME), metadata={"format": "pt"})
    shutil.copy2(Path(a) / "config.json", Path(out) / "config.json")
    return {"load": loaded - start, "align": aligned - loaded, "merge": time.perf_counter() - aligned, "sweeps": sweeps}


JOBS = {"streamed": job_streamed, "activation": job_activation, "floor": job_floor, "reference": job_reference}


def rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def run_job(name: str, a: Path, b: Path, out: Path) -> dict:
    """Run a job in a child process (one thread), sampling its RssAnon every 20 ms; its wall time and peak."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, __file__, "--job", name, str(a), str(b), str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], rss_anon(proc.pid))
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"job {name} failed ({proc.returncode})")
    inner = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 1), "peak_rss_anon_bytes": peak[0], "inner_s": inner}


def equals_a(a: Path, out: Path) -> bool:
    """Whether every tensor of the output equals A's exactly (bf16)."""
    import torch

    from hf_permerge.shards import ShardedTensors

    sa, so = ShardedTensors(a), ShardedTensors(out)
    return set(sa) == set(so) and all(torch.equal(sa[n], so[n]) for n in sa)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hf_permerge-streamed-bench"))
    parser.add_argument("--reference", action="store_true", help="also run the plain in-memory reference")
    parser.add_argument(
        "--jobs",
        nargs="+",
        choices=[j for j in JOBS if j != "reference"],
        default=["floor", "streamed"],
        help="which streamed jobs to run (default: floor streamed; activation: streamed activation matching)",
    )
    parser.add_argument("--job", nargs=4, metavar=("NAME", "A", "B", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        import torch

        torch.set_num_threads(1)
        name, a, b, out = args.job
        print(json.dumps(JOBS[name](a, b, out)))
        return
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    a, b = build_pair(args.work, args.layers)
    built = time.perf_counter() - start
    size = folder_bytes(a)
    rows = {}
    for name in list(args.jobs) + (["reference"] if args.reference else []):
        out = args.work / f"out-{name}-{args.layers}"
        rows[name] = run_job(name, a, b, out)
        rows[name]["output_equals_a"] = equals_a(a, out)
        rows[name]["peak_over_model_size"] = round(rows[name]["peak_rss_anon_bytes"] / size, 3)
        print(name, rows[name], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    result = {
        "layers": args.layers,
        "model_bytes_on_disk": size,
        "build_s": round(built, 1),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": 1, "torch": torch.__version__},
        "load_average": os.getloadavg(),
        "jobs": rows,
        **({"activation": ACTIVATION} if "activation" in rows else {}),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "-activation" if "activation" in rows else ""
    path = RESULTS / f"tinyllama-{args.layers}-layers{tag}-{time.strftime('%Y-%m-%dT%H%M')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print("wrote", path)


if __name__ == "__main__":
    main()
