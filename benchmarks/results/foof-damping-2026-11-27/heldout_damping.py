"""FOOF damping chosen on held-out training images, not on the test set.

For untrained 2x512 MLP pairs (seeds 10-15, none of which the reports use), the gradient matcher (FOOF,
damping d) matches on 10,000 training images (the matcher's seed-0 sample); the averaged permuted inits are
scored on 10,000 *other* training images (disjoint from the matching sample). The damping with the best
held-out accuracy is the package default. Run: .venv/bin/python benchmarks/results/foof-damping-2026-11-27/heldout_damping.py
"""
import json
import time

import torch

import hf_permerge  # noqa: F401
from hf_permerge import PermMLPConfig, PermMLPForImageClassification
from hf_permerge.alignment import get_matcher
from hf_permerge.data import load_tensors
from hf_permerge.data.tensors import TensorSplit

torch.set_num_threads(1)
train = load_tensors("fashion_mnist", "train")
order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
match_idx, held_idx = order[:10000], order[10000:20000]   # the matcher's own subset(10000, seed=0), and the rest
matching = TensorSplit(train.pixel_values[match_idx], train.labels[match_idx], "match")
held = TensorSplit(train.pixel_values[held_idx], train.labels[held_idx], "held-out")


def accuracy(model) -> float:
    with torch.no_grad():
        return (model(pixel_values=held.pixel_values).logits.argmax(1) == held.labels).float().mean().item()


rows = []
for seed_a, seed_b in [(10, 11), (12, 13), (14, 15)]:
    a = PermMLPForImageClassification(PermMLPConfig(depth=2, width=512, seed=seed_a)).eval()
    b = PermMLPForImageClassification(PermMLPConfig(depth=2, width=512, seed=seed_b)).eval()
    for damping in (1e-3, 1e-1, 1.0, 10.0):
        start = time.perf_counter()
        perms = get_matcher("gradient", damping=damping, num_examples=None).match(a, b, matching)
        pb = perms.apply(b).state_dict()
        mid = PermMLPForImageClassification(a.config).eval()
        mid.load_state_dict({k: 0.5 * v + 0.5 * pb[k] for k, v in a.state_dict().items()})
        rows.append({"seeds": [seed_a, seed_b], "damping": damping, "held_out_acc": accuracy(mid),
                     "seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]), flush=True)
for damping in (1e-3, 1e-1, 1.0, 10.0):
    accs = [r["held_out_acc"] for r in rows if r["damping"] == damping]
    print(f"damping {damping:g}: held-out accuracy of the averaged permuted inits {min(accs):.3f}-{max(accs):.3f} "
          f"(mean {sum(accs) / len(accs):.3f})")
