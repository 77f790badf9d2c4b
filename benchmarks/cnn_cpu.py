"""CNN on the CPU (issue: the CNN path is affordable on 2 cores): our training step, curve evaluation and
activation statistics, each against a plain PyTorch loop on the same nets and data, in the same run.

    python benchmarks/cnn_cpu.py [--layers 32-32-avg-64-64] [--steps 60] [--eval-images 10000] [--threads 1 2]

Reports seconds per net-epoch of training (600 steps of 100 images, SGD + momentum), per 11-point curve on
`--eval-images` test images and per activation matching on 10,000 training images, with the ratio
plain / ours (> 1: ours is faster). Variants: thread count, channels_last, evaluation batch size.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

import hf_permerge  # noqa: F401  (registers the models)
from hf_permerge.alignment import get_matcher
from hf_permerge.config import config_from_dict
from hf_permerge.data.tensors import load_tensors
from hf_permerge.evaluation.interpolation import evaluate_curve, interpolate_state_dicts
from hf_permerge.training.builders import build_model
from hf_permerge.training.engines import make_engine

STEPS_PER_EPOCH = 600


def plain_cnn(model) -> nn.Module:
    """The same CNN written as plain PyTorch layers, holding `model`'s weights."""
    layers, blocks = [], list(model.blocks)
    for block in blocks:
        layers += [
            nn.Conv2d(block.conv.in_channels, block.conv.out_channels, 3, padding=1, bias=block.conv.bias is not None),
            nn.ReLU(),
        ]
        if isinstance(block.pool, nn.AvgPool2d):
            layers.append(nn.AvgPool2d(2))
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(model.classifier.in_features, 10, bias=model.classifier.bias is not None),
    ]
    plain = nn.Sequential(*layers)
    ours = [p for p in model.parameters()]
    with torch.no_grad():
        for p, q in zip(plain.parameters(), ours, strict=True):
            p.copy_(q)
    return plain


def timed(fn, repeat: int = 1) -> float:
    fn()  # warm-up (allocations, kernel choice)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def train_plain(model, x, y, steps, channels_last=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()

    def run():
        for s in range(steps):
            xb = x[s * 100 : (s + 1) * 100].contiguous(memory_format=fmt)
            loss = F.cross_entropy(model(xb), y[s * 100 : (s + 1) * 100])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def train_ours(config, x, y, steps, nets=1):
    models = [build_model(config, i) for i in range(nets)]
    engine = make_engine(config.training.engine, models, config.training, "cpu")

    def run():
        for s in range(steps):
            xb = torch.stack([x[s * 100 : (s + 1) * 100]] * nets)
            yb = torch.stack([y[s * 100 : (s + 1) * 100]] * nets)
            engine.step(xb, yb)

    return run


def curve_plain(model, sd_a, sd_b, split, batch_size, mode=torch.inference_mode):
    def run():
        correct = []
        for i in range(11):
            model.load_state_dict(interpolate_state_dicts(sd_a, sd_b, i / 10))
            model.eval()
            with mode():
                hits = 0
                for s in range(0, len(split), batch_size):
                    hits += (
                        (model(split.pixel_values[s : s + batch_size]).argmax(-1) == split.labels[s : s + batch_size])
                        .sum()
                        .item()
                    )
            correct.append(hits / len(split))
        return correct

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="32-32-avg-64-64")
    parser.add_argument("--steps", type=int, default=60, help="training steps timed (an epoch is 600)")
    parser.add_argument("--eval-images", type=int, default=10000, help="test images per curve point")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    config = config_from_dict(
        {"model": {"type": "cnn", "layers": args.layers}, "training": {"optimizer": "sgd", "lr": 0.01, "num_nets": 2}}
    )
    train = load_tensors("fashion_mnist", "train")
    test = load_tensors("fashion_mnist", "test").subset(args.eval_images, seed=0)
    x, y = train.pixel_values[: args.steps * 100], train.labels[: args.steps * 100]
    rows = []

    def row(name, threads, seconds, reference=None, scale=1.0):
        r = {"what": name, "threads": threads, "seconds": round(seconds * scale, 2)}
        if reference is not None:
            r["plain_over_ours"] = round(reference / seconds, 2)
        rows.append(r)
        print(json.dumps(r), flush=True)

    per_epoch = STEPS_PER_EPOCH / args.steps
    for threads in args.threads:
        torch.set_num_threads(threads)
        model = build_model(config, 0)
        plain = timed(train_plain(plain_cnn(model), x, y, args.steps))
        row("train, plain loop, per net-epoch", threads, plain, scale=per_epoch)
        cl = timed(train_plain(plain_cnn(model), x, y, args.steps, channels_last=True))
        row("train, plain loop channels_last, per net-epoch", threads, cl, plain, scale=per_epoch)
        one = timed(train_ours(config, x, y, args.steps, nets=1))
        row("train, ours 1 net, per net-epoch", threads, one, plain, scale=per_epoch)
        two = timed(train_ours(config, x, y, args.steps, nets=2)) / 2
        row("train, ours 2 nets stacked, per net-epoch", threads, two, plain, scale=per_epoch)

        a, b = build_model(config, 0).eval(), build_model(config, 1).eval()
        sd_a, sd_b = a.state_dict(), b.state_dict()
        reference = timed(curve_plain(plain_cnn(a), plain_cnn(a).state_dict(), plain_cnn(b).state_dict(), test, 1000))
        n = len(test)
        row(f"curve, plain loop (inference_mode, batch 1000), 11 points x {n}", threads, reference)
        for batch in (500, 1000, 2500):
            ours = timed(functools.partial(evaluate_curve, a, sd_a, sd_b, splits={"test": test}, batch_size=batch))
            row(f"curve, ours (batch {batch}), 11 points x {n}", threads, ours, reference)
        stats = timed(functools.partial(get_matcher("activation", num_examples=10000).match, a, b, train))
        row("activation matching, 10k images", threads, stats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "layers": args.layers,
                    "machine": f"{os.cpu_count()} cores, {platform.processor()}",
                    "torch": torch.__version__,
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
