"""MergeMany (weight matching onto each other) with each match started from the App. D pass (the matcher's
default now) or from the identity of the permuted net (continuing from the current alignment). 8 MLPs per set,
1 epoch AdamW on Fashion-MNIST; both from the same star alignment (App. D start).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results/weight-start-2026-11-27/mergemany_start.py OUT_DIR
"""
import itertools, json, sys, time
from pathlib import Path
import torch
from hf_permerge.alignment import Permutations, WeightMatcher
from hf_permerge.alignment.average import align_to_average
from hf_permerge.config import config_from_dict
from hf_permerge.data import load_tensors
from hf_permerge.evaluation.interpolation import evaluate_model
from hf_permerge.merging import PermMerger
from hf_permerge.training import PairTrainer

out = Path(sys.argv[1])
test = load_tensors("fashion_mnist", "test")
for depth, width, seed in ((2, 512, 0), (2, 512, 1), (3, 256, 0)):
    folder = out / f"d{depth}_w{width}_s{seed}"
    if not (folder / "pair.json").exists():
        PairTrainer(config_from_dict({"model": {"type": "mlp", "depth": depth, "width": width},
                                      "training": {"num_nets": 8, "seed": seed, "epochs": 1}}), folder,
                    overwrite=True, progress=False).train()
    merger = PermMerger.from_pretrained(folder)
    models = [merger.load(i) for i in range(8)]
    keys = list(merger.spec.axes_to_perm())
    for bottom_up in (True, False):
        matcher = WeightMatcher(bottom_up=bottom_up)
        star = [Permutations.identity(merger.spec)] + [WeightMatcher().match(models[0], m) for m in models[1:]]
        t = time.perf_counter()
        perms, rounds = align_to_average(models, matcher, start=star)
        seconds = time.perf_counter() - t
        nets = [p.apply(m) for p, m in zip(perms, models)]
        total = sum(sum(torch.sum(a.state_dict()[k].double() * b.state_dict()[k].double()).item() for k in keys)
                    for a, b in itertools.combinations(nets, 2))
        merger.set_permutations(perms, matcher="weight")
        acc = evaluate_model(merger.merge_all(), test)["acc"]
        init_acc = evaluate_model(merger.merge_all("init"), test)["acc"]
        print(json.dumps({"depth": depth, "width": width, "seed": seed, "rounds_start": "App. D" if bottom_up else "identity",
                          "objective": round(total, 2), "avg8_trained": round(acc, 4), "avg8_init": round(init_acc, 4),
                          "rounds": rounds["rounds"], "s": round(seconds, 1)}), flush=True)
