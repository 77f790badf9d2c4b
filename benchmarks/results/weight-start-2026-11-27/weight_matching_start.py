"""Where weight matching's coordinate descent starts: the identity (Git Re-Basin, our default) or the paper's
App. D pass (first layer upward), against App. D's pass alone.

Pairs of MLPs trained 1 epoch with AdamW on Fashion-MNIST (the library's defaults); for each start, the
objective sum_k <theta_0[k], pi(theta_1)[k]> and the permuted midpoint's test accuracy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results/weight-start-2026-11-27/weight_matching_start.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch

from hf_permerge.alignment import Permutations, get_matcher
from hf_permerge.config import config_from_dict
from hf_permerge.data import load_tensors
from hf_permerge.evaluation.interpolation import evaluate_model
from hf_permerge.merging import PermMerger
from hf_permerge.training import PairTrainer

out = Path(sys.argv[1])
test = load_tensors("fashion_mnist", "test")
VARIANTS = {"identity start (Git Re-Basin, default)": {"bottom_up": False},   # the default when this ran (log)
            "App. D pass alone": {"bottom_up": True, "max_iter": 0},
            "App. D start + descent": {"bottom_up": True}}                      # the default since
rows = []
for depth, width in ((2, 128), (2, 512), (3, 512)):
    for seed in (0, 1, 2):
        folder = out / f"d{depth}_w{width}_s{seed}"
        if not (folder / "pair.json").exists():
            cfg = config_from_dict({"model": {"type": "mlp", "depth": depth, "width": width},
                                    "training": {"num_nets": 2, "seed": seed, "epochs": 1}})
            PairTrainer(cfg, folder, overwrite=True, progress=False).train()
        merger = PermMerger.from_pretrained(folder)
        a, b = merger.load(0), merger.load(1)
        keys = list(merger.spec.axes_to_perm())
        for name, settings in VARIANTS.items():
            perms = get_matcher("weight", **settings).match(a, b)
            permuted = perms.apply(b)
            objective = sum(torch.sum(a.state_dict()[k].double() * permuted.state_dict()[k].double()).item()
                            for k in keys)
            merger.set_permutations([Permutations.identity(merger.spec), perms], matcher="weight")
            acc = evaluate_model(merger.merge(0.5), test)["acc"]
            row = {"depth": depth, "width": width, "seed": seed, "variant": name, "objective": round(objective, 3),
                   "midpoint_acc": round(acc, 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
(out / "results.json").write_text(json.dumps(rows, indent=1))
