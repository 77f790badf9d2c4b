"""Speed of our engines against the simple reference loops of `benchmarks/reference.py`.

One process, one device. Every comparison runs reference and ours interleaved, several repeats,
and reports medians; a ratio is reference time / our time (> 1: ours is faster).

    python benchmarks/run_benchmarks.py                 # quick mode (38 min on the shared 2-core CPU, load ~6)
    python benchmarks/run_benchmarks.py --full          # more steps, more repeats, extra variants
    python benchmarks/run_benchmarks.py --only train,align --repeats 5

Sections: train (pair and 12 nets; 2x2048 MLP and 64-64-avg-128-128 CNN), align (2x2048 and
1x8192 pairs vs their Hungarian solves alone), curves (all 11-point curves of a 2x512 pair), run
(the README's main job). Prints a table and writes benchmarks/results/<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reference import reference_cnn, reference_curve, reference_mlp, train_one_net  # noqa: E402

MLP = {"type": "mlp", "depth": 2, "width": 2048}
CNN = {"type": "cnn", "layers": "64-64-avg-128-128", "bias": True}  # as reference_cnn (and the results so far)


# -- measuring ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def interleaved(cases: dict, repeats: int, device, warmup: bool = True) -> dict[str, list[float]]:
    """Time each case's `prepare()` -> `run()` (only `run` is timed), the cases interleaved per repeat.
    A case other than the first (the reference) that raises is reported and dropped, not fatal."""
    times = {name: [] for name in cases}
    for r in range(repeats + int(warmup)):
        for k, (name, prepare) in enumerate(cases.items()):
            if name not in times:
                continue
            try:
                run = prepare()
                sync(device)
                start = time.perf_counter()
                run()
                sync(device)
            except Exception as err:
                if k == 0:
                    raise
                print(f"case {name} failed and is left out: {err!r}", flush=True)
                del times[name]
                continue
            if r >= int(warmup):
                times[name].append(time.perf_counter() - start)
    return times


def summarise(times: dict[str, list[float]], reference: str) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        k: {"median_s": med[k], "all_s": [round(t, 4) for t in v], "ratio_vs_reference": med[reference] / med[k]}
        for k, v in times.items()
    }


# -- (a) training ------------------------------------------------------------------------------------------


def run_config(model: dict, num_nets: int, **training):
    from hf_permerge.config import config_from_dict

    return config_from_dict({"model": model, "training": {"num_nets": num_nets, **training}})


def bench_train(arch: str, num_nets: int, steps: int, repeats: int, device, full: bool) -> dict:
    from hf_permerge.data.tensors import load_tensors
    from hf_permerge.training import build_model
    from hf_permerge.training.engines import make_engine
    from hf_permerge.training.seeds import epoch_order

    train = load_tensors("fashion_mnist", "train", device)
    x, y = train.pixel_values, train.labels
    cfg = run_config(MLP if arch == "mlp" else CNN, num_nets)
    make_ref = (lambda: reference_mlp(2, 2048)) if arch == "mlp" else (lambda: reference_cnn(CNN["layers"]))

    def reference(fused: bool = False):
        def prepare():
            models = [make_ref().to(device) for _ in range(num_nets)]
            return lambda: [float(train_one_net(m, x, y, steps, seed=i, fused=fused)) for i, m in enumerate(models)]

        return prepare

    def ours(kind: str, **options):
        def prepare():
            engine = make_engine(kind, [build_model(cfg, i) for i in range(num_nets)], cfg.training, device, **options)
            orders = torch.stack([epoch_order(1000 + i, 0, len(y), device) for i in range(num_nets)])

            def run():  # the trainer's hot loop: index slices of the whole data set, no host sync inside
                loss_sum = torch.zeros(num_nets, device=device)
                for b in range(steps):
                    loss_sum += engine.step(*train.batches(orders[:, b * 100 : (b + 1) * 100]))
                return loss_sum.tolist()

            return run

        return prepare

    cases = {"reference": reference(), "ours": ours("stacked")}
    if full or num_nets == 2:  # quick mode: the per-net engine (as slow as the reference) on pairs only
        cases["per_net_engine"] = ours("per_net")
    if device.type == "cuda":  # captured once in the warm-up round (3 eager steps, then the capture)
        cases["stacked_cuda_graph"] = ours("stacked", cuda_graph=True)
    if full:
        cases["reference_fused_adamw"] = reference(fused=True)
        for fwd in ("vmap", "loop") if arch == "mlp" else ("vmap",) if device.type == "cpu" else ("loop",):
            cases[f"stacked_{fwd}"] = ours("stacked", forward=fwd)
        if arch == "mlp" and num_nets == 2:  # compiled once in the warm-up round, not timed
            cases["stacked_compiled"] = ours("stacked", compile=True)
    times = interleaved(cases, repeats, device)
    return {
        "arch": arch,
        "num_nets": num_nets,
        "steps_per_net": steps,
        "batch_size": 100,
        "results": summarise(times, "reference"),
        "load": load(),
    }


# -- (b) alignment -----------------------------------------------------------------------------------------


def bench_align(depth: int, width: int, train_steps: int, repeats: int, device) -> dict:
    """Whole `ActivationMatcher.match` (10k examples) vs the plain Hungarian solves of its groups, one after
    another (the matcher warm-starts them from 512 units on a GPU, 2048 on the CPU: `alignment.hungarian`)."""
    from hf_permerge.alignment.activation import ActivationMatcher, activation_statistics
    from hf_permerge.alignment.hungarian import solve_assignment
    from hf_permerge.data.tensors import load_tensors
    from hf_permerge.training import build_model
    from hf_permerge.training.engines import make_engine
    from hf_permerge.training.seeds import epoch_order

    train = load_tensors("fashion_mnist", "train", device)
    cfg = run_config({"type": "mlp", "depth": depth, "width": width}, 2)
    engine = make_engine("stacked", [build_model(cfg, i) for i in range(2)], cfg.training, device)
    orders = torch.stack([epoch_order(1000 + i, 0, len(train), device) for i in range(2)])
    for b in range(train_steps):
        engine.step(*train.batches(orders[:, b * 100 : (b + 1) * 100]))
    a, b = engine.export(0).eval(), engine.export(1).eval()
    matcher = ActivationMatcher()
    split = train.subset(matcher.num_examples, matcher.seed)
    stats = activation_statistics(a, b, split.pixel_values, a.permutation_spec())
    sims = {g: s.similarity("cosine") for g, s in stats.items()}
    # The reference: SciPy's solves of the same matrices without a warm start, one after another.
    cases = {
        "hungarian_alone": lambda: lambda: [solve_assignment(s, warm_start="none") for s in sims.values()],
        "align_total": lambda: lambda: matcher.match(a, b, train),
    }
    # the same solves with Sinkhorn potentials first, computed on the device (as the matcher does from
    # 512 units on a GPU and 2048 on the CPU)
    cases["warm_started_solves"] = lambda: lambda: [solve_assignment(s, warm_start="sinkhorn") for s in sims.values()]
    times = interleaved(cases, repeats, device, warmup=False)
    out = summarise(times, "hungarian_alone")
    return {
        "model": f"{depth}x{width}",
        "train_steps_before_align": train_steps,
        "num_examples": matcher.num_examples,
        "results": out,
        "align_over_hungarian": out["align_total"]["median_s"] / out["hungarian_alone"]["median_s"],
        "load": load(),
    }


# -- (c) curves --------------------------------------------------------------------------------------------


def bench_curves(train_steps: int, repeats: int, device) -> dict:
    """All four 11-point curves (final/init x vanilla/permuted) of a 2x512 pair on test 10k + train 10k."""
    from hf_permerge.alignment.activation import ActivationMatcher
    from hf_permerge.data.tensors import load_tensors
    from hf_permerge.evaluation.interpolation import evaluate_curve
    from hf_permerge.training import build_model
    from hf_permerge.training.engines import make_engine
    from hf_permerge.training.seeds import epoch_order

    train = load_tensors("fashion_mnist", "train", device)
    splits = {"test": load_tensors("fashion_mnist", "test", device), "train": train.subset(10000, seed=0)}
    cfg = run_config({"type": "mlp", "depth": 2, "width": 512}, 2)
    inits = [build_model(cfg, i).to(device).eval() for i in range(2)]
    engine = make_engine("stacked", [build_model(cfg, i) for i in range(2)], cfg.training, device)
    orders = torch.stack([epoch_order(1000 + i, 0, len(train), device) for i in range(2)])
    for b in range(train_steps):
        engine.step(*train.batches(orders[:, b * 100 : (b + 1) * 100]))
    finals = [copy.deepcopy(engine.export(i)).to(device).eval() for i in range(2)]
    perms = ActivationMatcher().match(finals[0], finals[1], train)
    pairs = []
    for m0, m1 in (finals, inits):
        sd0, sd1 = m0.state_dict(), m1.state_dict()
        pairs += [(sd0, sd1), (sd0, perms.apply(m1).state_dict())]
    lambdas = [i / 10 for i in range(11)]
    template = build_model(cfg, 0).to(device).eval()

    def ours():
        return lambda: [evaluate_curve(template, a, b, lambdas, splits) for a, b in pairs]

    def reference():
        return lambda: [
            reference_curve(template, a, b, lambdas, s.pixel_values, s.labels)
            for a, b in pairs
            for s in splits.values()
        ]

    times = interleaved({"reference": reference, "ours": ours}, repeats, device)
    return {
        "model": "2x512",
        "curves": len(pairs),
        "lambdas": len(lambdas),
        "splits": {k: len(v) for k, v in splits.items()},
        "results": summarise(times, "reference"),
        "load": load(),
    }


# -- (d) the README's main job -----------------------------------------------------------------------------


def bench_run(config_path: Path) -> dict:
    from hf_permerge.config import load_config
    from hf_permerge.reporting.pipeline import run

    config = load_config(config_path)
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        start = time.perf_counter()
        report = run(config, Path(tmp) / "demo", progress=False)
        wall = time.perf_counter() - start
    return {
        "config": str(config_path.relative_to(ROOT)),
        "wall_s": wall,
        "timings": report.get("timings"),
        "barrier_perm_test_acc": report["barrier"]["final"]["permuted"]["test"]["acc"],
        "load": load(),
    }


# -- driver ------------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ},
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def table(results: dict) -> str:
    lines = [f"{'benchmark':<44} {'case':<24} {'median s':>10} {'ratio':>7}"]
    for section, entries in results["sections"].items():
        for e in entries:
            label = {
                "train": lambda e=e: f"train {e['arch']} x{e['num_nets']} ({e['steps_per_net']} steps/net)",
                "align": lambda e=e: f"align {e['model']}",
                "curves": lambda e=e: f"curves {e['model']} ({e['curves']} x {e['lambdas']} pts)",
                "run": lambda e=e: f"run {e['config']}",
            }[section]()
            if section == "run":
                lines.append(f"{label:<44} {'wall':<24} {e['wall_s']:>10.1f} {'':>7}")
                continue
            for case, r in e["results"].items():
                lines.append(f"{label:<44} {case:<24} {r['median_s']:>10.2f} {r['ratio_vs_reference']:>7.2f}")
            if section == "align":
                lines.append(f"{label:<44} {'total / hungarian':<24} {'':>10} {e['align_over_hungarian']:>7.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="more steps and repeats, extra engine variants")
    p.add_argument("--only", default="train,align,curves,run", help="comma-separated sections")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 3 quick, 5 full)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="mlp,cnn", help="architectures to train (mlp: 2x2048, cnn: 64-64-avg-128-128)")
    p.add_argument("--nets", default="2,12", help="stack sizes to train")
    p.add_argument("--align", default="2x2048,1x8192", help="MLP pairs (depth x width) to align")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (5 if args.full else 3)
    sections = args.only.split(",")
    gpu = device.type == "cuda"
    # CPU step counts are far below the 5 epochs (3000 steps): ratios are what count.
    mlp_steps, cnn_steps = (
        (3000, 3000) if gpu and args.full else (600, 300) if gpu else (60, 8) if args.full else (20, 3)
    )
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(device),
        "mode": "full" if args.full else "quick",
        "repeats": repeats,
        "load_start": load(),
        "sections": {},
    }
    print(f"{results['machine']} load {results['load_start']}", flush=True)
    for name in sections:
        entries = results["sections"].setdefault(name, [])
        if name == "train":
            for arch, steps in (("mlp", mlp_steps), ("cnn", cnn_steps)):
                if arch not in args.arch.split(","):
                    continue
                for n in (int(v) for v in args.nets.split(",")):
                    entries.append(bench_train(arch, n, steps, repeats, device, args.full))
                    print(table({"sections": {name: entries[-1:]}}), flush=True)
        elif name == "align":
            for depth, width in (map(int, m.split("x")) for m in args.align.split(",")):
                # quick mode: one repeat of the 1x8192 pair (its plain Hungarian solve alone took 72-76 s
                # on 2 cores, and 58 s on the H200 machine's CPU)
                reps = repeats if args.full or width < 8192 else 1
                entries.append(bench_align(depth, width, 100 if args.full else 20, reps, device))
                print(table({"sections": {name: entries[-1:]}}), flush=True)
        elif name == "curves":
            entries.append(bench_curves(100 if args.full else 20, repeats, device))
            print(table({"sections": {name: entries[-1:]}}), flush=True)
        elif name == "run":
            entries.append(bench_run(ROOT / "configs" / "fmnist_mlp_2x512.yaml"))
            print(table({"sections": {name: entries[-1:]}}), flush=True)
        else:
            p.error(f"unknown section {name!r}")
    results["load_end"] = load()
    print("\n" + table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    tag = results["machine"].get("gpu", "cpu").replace(" ", "_")
    tag += "".join(f"-{k}={v}" for k, v in sorted(results["machine"]["env"].items())).lower()
    path = args.out / f"{results['machine']['host']}-{tag}-{results['date'][:16].replace(':', '')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
