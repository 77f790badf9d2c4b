"""Activation matching of a pair of small language models: ours (statistics streamed batch by batch over the
tokens) against a plain loop (every token's activations of every group kept, then one correlation per group).

Both read the same sequences, one forward pass per net, and solve the same assignments (SciPy); what differs is
how the statistics are gathered. Each runs in its own process with one thread; this process samples its
RssAnon (anonymous memory) every 20 ms. Also checked: both reach the same matching objective.

    OMP_NUM_THREADS=1 python benchmarks/text_activation.py /work/lmruns/kjv_llama6/net_0 /work/lmruns/kjv_llama6/net_1 \
        --blocks $HF_PERMERGE_CACHE/text/kjv-*/blocks --sequences 1024 --out benchmarks/results/text-activation.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(a: str, b: str, blocks: str, sequences: int):
    from datasets import load_from_disk

    from hf_permerge import PermMerger
    from hf_permerge.data.tokens import token_split

    merger = PermMerger.from_pretrained([a, b])
    split = token_split(load_from_disk(blocks)["train"]).subset(sequences, seed=0)
    return merger, merger.load(0), merger.load(1), split


def job_ours(a, b, blocks, sequences, batch_size) -> dict:
    from hf_permerge.alignment.activation import ActivationMatcher

    merger, model_a, model_b, split = load(a, b, blocks, sequences)
    start = time.perf_counter()
    perms = ActivationMatcher(num_examples=None, batch_size=batch_size).match(model_a, model_b, split)
    seconds = time.perf_counter() - start
    groups = perms.info["groups"]
    objective = sum(v["similarity_matched"] for v in groups.values())
    return {"seconds": seconds, "objective": objective, "tokens": split.num_tokens, "groups": len(groups)}


def job_reference(a, b, blocks, sequences, batch_size) -> dict:
    """The plain loop: hooks append each batch's activations (tokens x units) to lists; after the pass, one
    (tokens x units) matrix per group and net, columns normalised, A^T B (cosine), and one assignment per group."""
    import torch

    from hf_permerge.alignment.hungarian import solve_assignment, solve_coupled

    merger, model_a, model_b, split = load(a, b, blocks, sequences)
    spec = merger.spec
    start = time.perf_counter()
    kept = {0: {g.name: [] for g in spec.groups}, 1: {g.name: [] for g in spec.groups}}
    modules = {0: dict(model_a.named_modules()), 1: dict(model_b.named_modules())}
    handles = []
    for i in (0, 1):
        for g in spec.groups:

            def hook(module, inputs, output, i=i, g=g):
                out = output[0] if isinstance(output, tuple) else output
                kept[i][g.name].append(out.reshape(-1, out.shape[-1]).float().clone())

            handles.append(modules[i][g.activation].register_forward_hook(hook))
    with torch.no_grad():
        for s in range(0, len(split), batch_size):
            rows = slice(s, s + batch_size)
            model_a(**split.model_inputs(rows))
            model_b(**split.model_inputs(rows))
    for h in handles:
        h.remove()
    similarity = {}
    for g in spec.groups:
        acts = []
        for i in (0, 1):
            x = torch.cat(kept[i].pop(g.name))
            acts.append(x / x.norm(dim=0).clamp_min(1e-12))  # cosine, uncentred (the matcher's default)
        similarity[g.name] = acts[0].T @ acts[1]
        del acts
    objective = 0.0
    for g in spec.groups:
        coupled = spec.coupling_of(g.name)
        if coupled is None:
            perm = torch.arange(g.size) if g.rigid else solve_assignment(similarity[g.name], g.blocks)
            objective += float(similarity[g.name][torch.arange(g.size), perm].double().sum())
        elif g.name == coupled[-1]:
            for n, perm in zip(
                coupled, solve_coupled([similarity[n] for n in coupled], g.blocks, [spec[n].rigid for n in coupled])
            ):
                objective += float(similarity[n][torch.arange(spec[n].size), perm].double().sum())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "objective": objective, "tokens": split.num_tokens, "groups": len(spec.groups)}


JOBS = {"ours": job_ours, "reference": job_reference}


def rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def run_job(name: str, args) -> dict:
    """Run a job in a child process (one thread), sampling its RssAnon every 20 ms: its result and peak."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, __file__, "--job", name, args.a, args.b, "--blocks", args.blocks,
           "--sequences", str(args.sequences), "--batch-size", str(args.batch_size)]  # fmt: skip
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
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"job {name} failed ({proc.returncode})")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss_anon_bytes": peak[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--blocks", required=True, help="a text cache's blocks folder (a DatasetDict of input_ids)")
    parser.add_argument("--sequences", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--job", choices=list(JOBS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(JOBS[args.job](args.a, args.b, args.blocks, args.sequences, args.batch_size)))
        return
    runs = {"ours": [], "reference": []}
    for _ in range(args.repeats):  # interleaved
        for name in runs:
            runs[name].append(run_job(name, args))
            print(name, runs[name][-1], flush=True)
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    summary = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, one thread per job",
        "load_average": os.getloadavg(),
        "pair": [args.a, args.b],
        "sequences": args.sequences,
        "tokens": best["ours"]["tokens"],
        "runs": runs,
        "time_ratio": best["reference"]["seconds"] / best["ours"]["seconds"],
        "memory_ratio": best["reference"]["peak_rss_anon_bytes"] / best["ours"]["peak_rss_anon_bytes"],
        "objective_difference": abs(best["reference"]["objective"] - best["ours"]["objective"]),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
