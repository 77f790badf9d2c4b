"""Held-out check of scale-only REPAIR (bias-free layers: the paper's default MLP and CNN) against no repair.

Pairs trained here from the library's defaults (AdamW 1e-3, batch 100, real Fashion-MNIST); nets 0 and 1
aligned by activations on 5,000 training images; test accuracy / loss of the permuted merge at alpha 0.3 / 0.5.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results/repair-heldout-2026-11-27/scale_only_repair.py OUT_DIR
"""
import sys
from pathlib import Path

from hf_permerge.config import config_from_dict
from hf_permerge.data import load_tensors
from hf_permerge.evaluation.interpolation import evaluate_model
from hf_permerge.merging import PermMerger
from hf_permerge.training import PairTrainer

out = Path(sys.argv[1])
test = load_tensors("fashion_mnist", "test")
runs = {"mlp": ({"type": "mlp", "depth": 2, "width": 128}, {"num_nets": 4, "seed": 0, "epochs": 1}),
        "cnn": ({"type": "cnn", "layers": "8-avg-16-avg-32"}, {"num_nets": 2, "seed": 0, "epochs": 1, "max_steps": 150})}
for name, (model, training) in runs.items():
    folder = out / name
    if not (folder / "pair.json").exists():
        PairTrainer(config_from_dict({"model": model, "training": training}), folder, overwrite=True,
                    progress=False).train()
    merger = PermMerger.from_pretrained(folder)
    merger.align(num_examples=5000)
    for alpha in (0.3, 0.5):
        plain = evaluate_model(merger.merge(alpha), test)
        repaired = evaluate_model(merger.merge(alpha, repair="repair"), test)
        print(f"{name} {model} alpha={alpha}: no repair acc {plain['acc']:.4f} loss {plain['loss']:.4f} | "
              f"scale-only REPAIR acc {repaired['acc']:.4f} loss {repaired['loss']:.4f}", flush=True)
