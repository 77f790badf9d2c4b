"""Cross-evaluation of hf_permerge against the independent reference (/work/shared/anchors/ref_repro.py).

Nets come from either implementation (ref: its init + AdamW loop; ours: PairTrainer), trained on inputs
normalised one way or the other (repo: MNIST's (0.1307, 0.3081), as the authors' code; dataset:
Fashion-MNIST's own (0.2860, 0.3530), hf_permerge's default). Each pair is then matched by either
implementation (ref: find_perms; ours: ActivationMatcher) and its midpoint evaluated by either (ref:
evaluate; ours: evaluate_curve), on the same normalised inputs the nets were trained on. The reference is
imported from its path at run time, not copied. Trained pairs are cached under --cache.

  .venv/bin/python benchmarks/results/crosscheck/crosscheck.py --nets ref ours --norms repo dataset \
      --seeds 0 1 2 --out benchmarks/results/crosscheck/mlp2x512.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

from hf_permerge.alignment import get_matcher
from hf_permerge.config import load_config
from hf_permerge.data.tensors import TensorSplit, normalise
from hf_permerge.evaluation.interpolation import evaluate_curve
from hf_permerge.training import PairTrainer
from hf_permerge.models import (PermCNNConfig, PermCNNForImageClassification, PermMLPConfig,
                                PermMLPForImageClassification)

REF_PATH = "/work/shared/anchors/ref_repro.py"
DATA_DIR = "/usr/share/datasets/fashion-mnist"
NORMS = {"repo": (0.1307, 0.3081), "dataset": (0.2860, 0.3530)}


def load_ref():
    spec = importlib.util.spec_from_file_location("ref_repro", REF_PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ref = load_ref()


def raw_arrays():
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = ref._read_idx(f"{DATA_DIR}/{prefix}-images-idx3-ubyte.gz")
        y = ref._read_idx(f"{DATA_DIR}/{prefix}-labels-idx1-ubyte.gz")
        out[split] = (np.ascontiguousarray(x), y.astype(np.int64))
    return out


RAW = raw_arrays()


def splits_for(norm: str) -> dict[str, TensorSplit]:
    """Both splits as (N, 1, 28, 28), normalised with `norm`'s constants (the same tensors feed both codes)."""
    mean, std = NORMS[norm]
    return {s: TensorSplit(normalise(x, (mean,), (std,)), torch.from_numpy(y), f"{s}-{norm}") for s, (x, y) in RAW.items()}


# ----------------------------------------------------------------------------- conversion
def ref_spec(a):
    if a.arch == "mlp":
        return {"arch": "mlp", "widths": [784] + [a.width] * a.depth + [10]}
    return {"arch": "cnn", "ops": a.cnn_arch.split("-"), "in_ch": 1}


def our_model(a, norm: str):
    mean, std = NORMS[norm]
    common = dict(num_labels=10, bias=False, image_mean=(mean,), image_std=(std,))
    if a.arch == "mlp":
        return PermMLPForImageClassification(PermMLPConfig(depth=a.depth, width=a.width, **common))
    return PermCNNForImageClassification(PermCNNConfig(layers=a.cnn_arch, batch_norm=False, **common))


def weight_keys(model):
    return [k for k in model.state_dict() if k.endswith("weight")]


def ws_to_model(a, ws, norm):
    m = our_model(a, norm)
    m.load_state_dict(dict(zip(weight_keys(m), [w.clone() for w in ws])), strict=True)
    return m.eval()


def model_to_ws(model):
    sd = model.state_dict()
    return [sd[k].detach().clone() for k in weight_keys(model)]


def ref_input(a, x):
    return x.flatten(1) if a.arch == "mlp" else x


# ----------------------------------------------------------------------------- nets
def ref_nets(a, seed, norm, splits):
    """The reference's pair of a seed: (reference net, moving net), each {init, trained} weight lists."""
    spec = ref_spec(a)
    data = {s: (ref_input(a, t.pixel_values), t.labels) for s, t in splits.items()}
    gens = [torch.Generator().manual_seed(10_000 * seed + 17 * i) for i in range(2)]
    inits = [ref.init_weights(spec, g, "cpu") for g in gens]
    trained = [ref.train(spec, w, data, a.epochs, 100, a.lr, g, "cpu") for w, g in zip(inits, gens)]
    # ref aligns net1 onto net2: net 1 is the reference, net 0 moves
    return ({"init": inits[1], "trained": trained[1]}, {"init": inits[0], "trained": trained[0]})


def our_nets(a, seed, norm, workdir: Path):
    """Our pair of a seed, trained by PairTrainer on `norm`'s inputs: (net 0 = reference, net 1 = moving)."""
    cfg_file = "configs/fmnist_mlp_2x512.yaml" if a.arch == "mlp" else "configs/paper_cnn.yaml"
    sets = [f"training.seed={seed}", f"training.epochs={a.epochs}", "training.save_steps=[]",
            "training.optimizer=adamw", f"training.lr={a.lr}", "training.weight_decay=0.01",
            "training.eval_each_epoch=false"]
    sets += ([f"model.depth={a.depth}", f"model.width={a.width}"] if a.arch == "mlp" else [f"model.layers={a.cnn_arch}"])
    if a.init_override:
        sets.append(f"model.init={a.init_override}")
    sets.append(f"data.normalisation={'mnist' if norm == 'repo' else 'dataset'}")
    PairTrainer(load_config(cfg_file, sets), workdir, overwrite=True, progress=False).train()
    mean = NORMS[norm][0]
    out = []
    for i in range(2):
        nets = {}
        for ck in ("init", "final"):
            folder = workdir / f"net_{i}" / ck
            cls = PermMLPForImageClassification if a.arch == "mlp" else PermCNNForImageClassification
            m = cls.from_pretrained(folder)
            assert abs(m.config.image_mean[0] - mean) < 1e-6, m.config.image_mean
            nets["trained" if ck == "final" else "init"] = model_to_ws(m)
        out.append(nets)
    return out[0], out[1]


# ----------------------------------------------------------------------------- matching / evaluation
def match_ref(a, w_ref, w_mov, splits, idx):
    x = ref_input(a, splits["train"].pixel_values[idx])
    perms, stats = ref.find_perms(ref_spec(a), w_ref, w_mov, x)
    return (lambda ws: ref.apply_perms(ws, perms)), [s["mean_cos_matched"] for s in stats]


def match_ours(a, w_ref, w_mov, splits, idx, norm):
    m_ref, m_mov = ws_to_model(a, w_ref, norm), ws_to_model(a, w_mov, norm)
    sub = TensorSplit(splits["train"].pixel_values[idx], splits["train"].labels[idx], "match")
    perms = get_matcher("activation", similarity="cosine", num_examples=None).match(m_ref, m_mov, sub)
    return (lambda ws: model_to_ws(perms.apply(ws_to_model(a, ws, norm)))), None


def eval_ref(a, w1, w2, splits):
    x, y = splits["test"].pixel_values, splits["test"].labels
    return ref.evaluate(ref_spec(a), ref.lerp(w1, w2, 0.5), ref_input(a, x), y)["acc"]


def eval_ours(a, w1, w2, splits, norm):
    m1, m2 = ws_to_model(a, w1, norm), ws_to_model(a, w2, norm)
    return evaluate_curve(m1, m1.state_dict(), m2.state_dict(), [0.5], {"test": splits["test"]})["test"]["acc"][0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["mlp", "cnn"], default="mlp")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--cnn-arch", default="32-32-avg-64-64")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nets", nargs="+", default=["ref", "ours"], choices=["ref", "ours"])
    ap.add_argument("--norms", nargs="+", default=["repo", "dataset"], choices=list(NORMS))
    ap.add_argument("--subset", choices=["ref", "ours"], default="ref",
                    help="matching images: ref = randperm(seed)[:10k] per seed; ours = the matcher's seed-0 draw")
    ap.add_argument("--init-override", default=None, help="our nets: model.init")
    ap.add_argument("--cache", default="runs/crosscheck")
    ap.add_argument("--out", required=True)
    ap.add_argument("--check-training", type=int, default=0, metavar="STEPS",
                    help="only compare the reference's training with our engines on STEPS batches")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.check_training:
        res = check_training(a.check_training)
        print(json.dumps(res))
        Path(a.out).write_text(json.dumps(res, indent=1))
        return

    rows = []
    out_path = Path(a.out)
    for norm in a.norms:
        splits = splits_for(norm)
        for seed in a.seeds:
            idx = torch.randperm(60000, generator=torch.Generator().manual_seed(seed if a.subset == "ref" else 0))[:10000]
            for src in a.nets:
                tag = f"{a.arch}-{a.depth}x{a.width}" if a.arch == "mlp" else f"cnn-{a.cnn_arch}"
                cache = Path(a.cache) / f"{tag}-e{a.epochs}-{src}-{norm}-s{seed}{'-' + a.init_override if a.init_override else ''}.pt"
                t0 = time.time()
                if cache.exists():
                    n_ref, n_mov = torch.load(cache)
                else:
                    n_ref, n_mov = (ref_nets(a, seed, norm, splits) if src == "ref"
                                    else our_nets(a, seed, norm, Path(a.cache) / (cache.stem + "-pair")))
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    torch.save((n_ref, n_mov), cache)
                train_s = time.time() - t0
                singles = [eval_ref(a, n["trained"], n["trained"], splits) for n in (n_ref, n_mov)]
                for matcher in ("ref", "ours"):
                    if matcher == "ref":
                        perm, cos = match_ref(a, n_ref["trained"], n_mov["trained"], splits, idx)
                    else:
                        perm, cos = match_ours(a, n_ref["trained"], n_mov["trained"], splits, idx, norm)
                    p_tr, p_in = perm(n_mov["trained"]), perm(n_mov["init"])
                    for evaluator in ("ref", "ours"):
                        ev = (lambda w1, w2: eval_ref(a, w1, w2, splits)) if evaluator == "ref" else \
                             (lambda w1, w2: eval_ours(a, w1, w2, splits, norm))
                        row = {"arch": tag, "epochs": a.epochs, "norm": norm, "seed": seed, "nets": src,
                               "matcher": matcher, "evaluator": evaluator, "subset": a.subset,
                               "init_override": a.init_override, "single": singles,
                               "vanilla": ev(n_mov["trained"], n_ref["trained"]),
                               "permuted": ev(p_tr, n_ref["trained"]),
                               "vanilla_init": ev(n_mov["init"], n_ref["init"]),
                               "permuted_init": ev(p_in, n_ref["init"]),
                               "mean_cos_matched": cos, "train_s": train_s}
                        rows.append(row)
                        print(f"{tag} norm={norm:7s} seed={seed} nets={src:4s} match={matcher:4s} eval={evaluator:4s} "
                              f"single {singles[0]:.4f}/{singles[1]:.4f} vanilla {row['vanilla']:.4f} "
                              f"permuted {row['permuted']:.4f} | init vanilla {row['vanilla_init']:.4f} "
                              f"permuted {row['permuted_init']:.4f}  ({train_s:.0f}s train)", flush=True)
                out_path.write_text(json.dumps({"args": vars(a), "torch": torch.__version__, "rows": rows}, indent=1))


def check_training(steps: int = 100, norm: str = "repo", seed: int = 0) -> dict:
    """Same init, same batches: the reference's `train` and each of our engines on the first `steps` batches
    of its data order; the largest weight difference between them (0 up to float rounding: same training)."""
    from hf_permerge.config import TrainingSection
    from hf_permerge.training.engines import make_engine

    class A:
        arch, depth, width = "mlp", 2, 512
    splits = splits_for(norm)
    x, y = splits["train"].pixel_values[:steps * 100], splits["train"].labels[:steps * 100]
    spec = ref_spec(A)
    g = torch.Generator().manual_seed(10_000 * seed)
    init = ref.init_weights(spec, g, "cpu")
    state = g.get_state()
    trained = ref.train(spec, init, {"train": (x.flatten(1), y)}, 1, 100, 1e-3, g, "cpu")
    order = torch.randperm(len(x), generator=torch.Generator().set_state(state))
    tc = TrainingSection(optimizer="adamw", lr=1e-3, weight_decay=1e-2)
    out = {}
    for kind in ("per_net", "stacked"):
        engine = make_engine(kind, [ws_to_model(A, init, norm).train()], tc, "cpu")
        for s in range(0, len(x), 100):
            idx = order[s:s + 100]
            engine.step(x[idx][None], y[idx][None])
        ours = model_to_ws(engine.export(0))
        out[kind] = max((a - b).abs().max().item() for a, b in zip(ours, trained))
        out[kind + "_rel"] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, trained))
    out["moved"] = max((a - b).abs().max().item() for a, b in zip(init, trained))
    return out


if __name__ == "__main__":
    main()
