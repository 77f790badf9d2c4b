"""The simple per-net reference loops the benchmarks compare against (no Hugging Face, no engine).

Training: the whole data set is one tensor on the device, each net is a plain `nn.Sequential`
with its own `torch.optim.AdamW` (default settings), trained alone, one step per batch of 100,
batches are index slices of a per-epoch permutation. This is the issue's "independent compact
reference"; the nets are trained one after the other, as one would without a stacked engine.

Curves: one merged state dict per lambda, one plain forward pass per lambda.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def reference_mlp(depth: int, width: int, d_in: int = 784, num_labels: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip([d_in] + [width] * (depth - 1), [width] * depth):
        layers += [nn.Linear(a, b, bias=False), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, num_labels, bias=False))


def reference_cnn(layers: str, c_in: int = 1, num_labels: int = 10) -> nn.Sequential:
    """'64-64-avg-128-128' -> 3x3 convs + ReLU, 2x2 avg pools, global average pool, linear read-out."""
    mods: list[nn.Module] = []
    for tok in layers.split("-"):
        if tok == "avg":
            mods.append(nn.AvgPool2d(2))
        else:
            mods += [nn.Conv2d(c_in, int(tok), 3, padding=1), nn.ReLU()]
            c_in = int(tok)
    return nn.Sequential(*mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_labels))


def train_one_net(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    seed: int,
    batch_size: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    fused: bool = False,
) -> torch.Tensor:
    """`steps` AdamW steps on batches of `batch_size`; returns the summed loss (a device tensor: no syncs).

    `fused=False` is PyTorch's default AdamW; `fused=True` only to show how much of our speed-up it explains.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused or None)
    g = torch.Generator().manual_seed(seed)
    per_epoch = len(y) // batch_size
    loss_sum = torch.zeros((), device=x.device)
    order = None
    for step in range(steps):
        b = step % per_epoch
        if b == 0:
            order = torch.randperm(len(y), generator=g).to(x.device)
        idx = order[b * batch_size : (b + 1) * batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach()
    return loss_sum


def train_reference(
    make_model, num_nets: int, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0
) -> list[nn.Module]:
    """Train `num_nets` fresh nets one after the other; each has its own seed for init and data order."""
    models = []
    for i in range(num_nets):
        torch.manual_seed(seed + i)
        model = make_model().to(x.device)
        train_one_net(model, x, y, steps, seed=seed + 1000 + i)
        models.append(model)
    return models


@torch.no_grad()
def reference_curve(
    model: nn.Module, sd_a: dict, sd_b: dict, lambdas, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
) -> tuple[list[float], list[float]]:
    """(losses, accuracies) along (1 - lam) * sd_a + lam * sd_b, one lambda at a time."""
    losses, accs = [], []
    model.eval()
    for lam in lambdas:
        model.load_state_dict({k: (1 - lam) * sd_a[k] + lam * sd_b[k] for k in sd_a})
        loss = torch.zeros((), device=x.device)
        correct = torch.zeros((), device=x.device)
        for s in range(0, len(y), batch_size):
            logits = model(pixel_values=x[s : s + batch_size], return_dict=False)[0]
            loss += F.cross_entropy(logits, y[s : s + batch_size], reduction="sum")
            correct += (logits.argmax(-1) == y[s : s + batch_size]).sum()
        losses.append(loss / len(y))
        accs.append(correct / len(y))
    return [float(v) for v in losses], [float(v) for v in accs]
