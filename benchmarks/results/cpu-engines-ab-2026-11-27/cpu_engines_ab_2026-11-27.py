"""CPU A/B of the engines on 12 2x2048 MLPs in one process, alternated: ms per net and step (BENCHMARKS.md).

    .venv/bin/python benchmarks/results/cpu-engines-ab-2026-11-27/cpu_engines_ab_2026-11-27.py
"""
import sys, time, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks")); sys.path.insert(0, str(ROOT))
from run_benchmarks import run_config, reference_mlp, train_one_net
from hf_permerge.data.tensors import load_tensors
from hf_permerge.training import build_model
from hf_permerge.training.engines import make_engine
from hf_permerge.training.seeds import epoch_order
dev = torch.device("cpu")
train = load_tensors("fashion_mnist", "train", dev)
N, steps = 12, 6
cfg = run_config({"type": "mlp", "depth": 2, "width": 2048}, N)
orders = torch.stack([epoch_order(1000 + i, 0, len(train), dev) for i in range(N)])
engines = {"bmm": make_engine("stacked", [build_model(cfg, i) for i in range(N)], cfg.training, dev, forward="bmm"),
           "loop": make_engine("stacked", [build_model(cfg, i) for i in range(N)], cfg.training, dev, forward="loop"),
           "per_net": make_engine("per_net", [build_model(cfg, i) for i in range(N)], cfg.training, dev)}
refs = [reference_mlp(2, 2048) for _ in range(N)]
res = {k: [] for k in [*engines, "reference"]}
for r in range(4):
    for k, e in engines.items():
        t = time.perf_counter()
        for b in range(steps):
            e.step(*train.batches(orders[:, b * 100:(b + 1) * 100]))
        res[k].append((time.perf_counter() - t) / steps / N * 1e3)
    t = time.perf_counter()
    for i, m in enumerate(refs):
        train_one_net(m, train.pixel_values, train.labels, steps, seed=i)
    res["reference"].append((time.perf_counter() - t) / steps / N * 1e3)
for k, v in res.items():
    print(k, "ms per net-step:", " ".join(f"{x:.1f}" for x in v))
