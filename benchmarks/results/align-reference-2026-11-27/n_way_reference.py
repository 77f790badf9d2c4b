"""Fig. 3 mid with the nets aligned onto each other (`reference="average"`) vs onto net 0 (the paper's).

N = 8 one-hidden-layer MLPs per width and seed, trained 1 epoch with AdamW on Fashion-MNIST (the paper's
Fig. 3 mid recipe); permutations found on the trained weights, applied to the trained nets and to their
inits; test accuracy of the uniform average of the first k nets, k = 2..8. Same nets for every matcher
and reference.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results/align-reference-2026-11-27/n_way_reference.py OUT_DIR
"""
import json
import sys
import time
from pathlib import Path

import torch

from hf_permerge.config import config_from_dict
from hf_permerge.data import load_tensors
from hf_permerge.merging import PermMerger
from hf_permerge.reporting.report import n_way
from hf_permerge.training import PairTrainer

out = Path(sys.argv[1])
widths = [int(w) for w in (sys.argv[2] if len(sys.argv) > 2 else "128,512,2048").split(",")]
seeds = [int(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "0,1").split(",")]
test = load_tensors("fashion_mnist", "test")
results = []
for width in widths:
    for seed in seeds:
        folder = out / f"w{width}_s{seed}"
        if not (folder / "pair.json").exists():
            cfg = config_from_dict({"model": {"type": "mlp", "depth": 1, "width": width},
                                    "training": {"num_nets": 8, "seed": seed, "epochs": 1, "optimizer": "adamw",
                                                 "lr": 1e-3, "weight_decay": 1e-2}})
            PairTrainer(cfg, folder, progress=False, resume=folder.exists()).train()   # a killed run resumes
        for matcher in ("activation", "weight"):
            for reference in ("net_0", "average"):
                merger = PermMerger.from_pretrained(folder)
                start = time.perf_counter()
                merger.align(matcher=matcher, reference=reference)
                align_s = time.perf_counter() - start
                res = n_way(merger, test, 10000, ("final", "init"))
                row = {"width": width, "seed": seed, "matcher": matcher, "reference": reference,
                       "align_s": round(align_s, 2), "rounds": merger.alignment.get("rounds"),
                       "converged": merger.alignment.get("converged"),
                       **{f"{ck}_k{k}": round(res[str(k)][ck]["permuted"]["test"]["acc"], 4)
                          for ck in ("final", "init") for k in (2, 4, 8)},
                       **{f"{ck}_k8_vanilla": round(res["8"][ck]["vanilla"]["test"]["acc"], 4) for ck in ("final", "init")}}
                results.append(row)
                print(json.dumps(row), flush=True)
(out / "results.json").write_text(json.dumps(results, indent=1))
