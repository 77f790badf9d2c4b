"""Why the CPU's stacked MLP step computes its gradients by hand: page faults per step (BENCHMARKS.md).

Twelve 2x2048 MLPs, 20 timed steps after 3 warm-up steps, one mode per process:
    for m in autograd by_hand per_net; do .venv/bin/python benchmarks/results/cpu-page-faults-2026-11-27/cpu_page_faults_2026-11-27.py $m; done
"""
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from hf_permerge.config import config_from_dict  # noqa: E402
from hf_permerge.data.tensors import load_tensors  # noqa: E402
from hf_permerge.training import build_model  # noqa: E402
from hf_permerge.training.engines import make_engine  # noqa: E402
from hf_permerge.training.seeds import epoch_order  # noqa: E402

mode = sys.argv[1]
train = load_tensors("fashion_mnist", "train", "cpu")
N, steps = 12, 20
cfg = config_from_dict({"model": {"type": "mlp", "depth": 2, "width": 2048}, "training": {"num_nets": N}})
engine = make_engine("per_net" if mode == "per_net" else "stacked", [build_model(cfg, i) for i in range(N)],
                     cfg.training, "cpu")
if mode == "autograd":
    engine.grads_by_hand = False          # the engine's autograd step, as before the change
orders = torch.stack([epoch_order(1000 + i, 0, len(train), "cpu") for i in range(N)])
for b in range(3):
    engine.step(*train.batches(orders[:, b * 100:(b + 1) * 100]))
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = time.perf_counter()
for b in range(3, 3 + steps):
    engine.step(*train.batches(orders[:, b * 100:(b + 1) * 100]))
ms = (time.perf_counter() - start) / steps / N * 1e3
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
print(f"{mode:9s} {ms:6.2f} ms per net and step, {faults:7.0f} minor page faults per step", flush=True)
