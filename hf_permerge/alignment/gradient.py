r"""Matching at initialisation without training (paper App. B, eq. 4).

Notation: theta_a is the reference (model_a), theta_b the net we permute (model_b), pi acts on
theta_b, and g_a, g_b are the update directions at theta_a, theta_b (the loss gradient, or the
FOOF direction below). Eq. (4), with theta_1 = theta_b and theta_2 = theta_a, asks that moving
from each net towards the other lowers the loss to first order:

    min_pi  (pi(theta_b) - theta_a) . g_a  +  (pi^{-1}(theta_a) - theta_b) . g_b .

A permutation is orthogonal, so pi^{-1}(theta_a) . g_b = theta_a . pi(g_b); dropping the constants
-theta_a . g_a - theta_b . g_b leaves

    max_pi  <-g_a, pi(theta_b)>  +  <-theta_a, pi(g_b)>,

a sum of linear matching terms, solved by `solve_linear_matching` with the pairs
(-g_a, theta_b) and (-theta_a, g_b): group by group with the Hungarian algorithm, the first
sweep layer by layer from the input up, then further sweeps until nothing improves.

Not a similarity: matched with a permuted copy of itself, a net need not get that permutation back (the
objective pairs one net's weights with the other's gradients, and the best such pairing is seldom the
identity). What holds, and is tested, is that the result does not depend on how the units are labelled:
relabelling net b's units relabels the permutation found, and the merge is the same.

FOOF (Benzing 2022) replaces the gradient G of a Linear / Conv2d weight by G (E[x x^T] + lambda I)^{-1},
x the layer's input (for a conv, its unfolded k x k patches, C_in*k*k dims; every position a sample),
extended by a constant 1 when the layer has a bias so weight and bias are preconditioned together.
lambda = damping * trace(E[x x^T]) / dim, i.e. `damping` is relative to the mean eigenvalue.
Other parameters (BatchNorm affine) keep their raw gradient; buffers have none and drop out.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    Matcher,
    batch_slices,
    check_choice,
    check_matching_data,
    check_same_architecture,
    eval_mode,
    model_device,
    model_input,
)
from .permutations import Permutations
from .weight import solve_linear_matching

PRECONDITIONERS = ("foof", "none")
_UNFOLD_BUDGET = 1 << 24  # elements of unfolded patches held at once


def conv_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H_out*W_out, C*kh*kw) patches, ordered like `weight.reshape(C_out, -1)`.

    F.unfold computes the same thing but is very slow on CPU; shifted strided views are not.
    """
    if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise NotImplementedError("FOOF supports Conv2d with groups=1 and numeric zero padding")
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = module.kernel_size, module.stride, module.dilation, module.padding
    x = F.pad(x, (pw, pw, ph, ph))
    h_out = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    shifts = [
        x[:, :, i * dh : i * dh + sh * (h_out - 1) + 1 : sh, j * dw : j * dw + sw * (w_out - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = torch.stack(shifts, dim=2)  # (N, C, kh*kw, H_out, W_out)
    return patches.permute(0, 3, 4, 1, 2).reshape(-1, x.shape[1] * kh * kw)


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(rows, dim) inputs of a Linear, or the patches of a Conv2d, with a 1-column when there is a bias."""
    x = conv_patches(module, x) if isinstance(module, nn.Conv2d) else x.reshape(-1, x.shape[-1])
    if module.bias is not None:
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    return x


class _SecondMoment:
    """Streaming sum of x x^T over a layer's input rows, in chunks that bound the patches' memory."""

    def __init__(self):
        self.sum, self.count = None, 0

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        per_row = x[0].numel() * (module.kernel_size[0] * module.kernel_size[1] if isinstance(module, nn.Conv2d) else 1)
        for chunk in x.detach().split(max(1, _UNFOLD_BUDGET // max(per_row, 1))):
            rows = layer_inputs(module, chunk)
            # a preconditioner is damped and needs no float64 products; the running sum is float64
            product = (rows.T @ rows).to(torch.float64)
            self.sum = product if self.sum is None else self.sum.add_(product)
            self.count += rows.shape[0]


def update_directions(
    model: nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    preconditioner: str = "foof",
    damping: float = 1.0,
    batch_size: int = 1000,
) -> dict[str, torch.Tensor]:
    """Mean-loss gradient of every parameter (eval mode), with FOOF directions for Linear/Conv2d layers."""
    check_choice("preconditioner", preconditioner, PRECONDITIONERS)
    device = model_device(model)
    params = dict(model.named_parameters())
    grads = {k: torch.zeros_like(p) for k, p in params.items()}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    moments = {n: _SecondMoment() for n in layers}
    handles = []
    if preconditioner == "foof":
        for n, m in layers.items():
            handles.append(m.register_forward_pre_hook(lambda mod, inputs, n=n: moments[n].update(mod, inputs[0])))
    frozen = [p for p in params.values() if not p.requires_grad]
    try:
        for p in frozen:  # a frozen net still has a gradient; we only read it
            p.requires_grad_(True)
        with eval_mode(model), torch.enable_grad():
            for s in batch_slices(len(pixel_values), batch_size):
                x, y = model_input(model, pixel_values[s]), labels[s].to(device)
                loss = model(pixel_values=x, labels=y).loss * (len(x) / len(pixel_values))
                for k, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                    if g is not None:
                        grads[k] += g
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
    if preconditioner == "none":
        return grads
    for n, m in layers.items():
        sigma = moments[n].sum / moments[n].count
        sigma = sigma + damping * sigma.diagonal().mean() * torch.eye(
            len(sigma), dtype=sigma.dtype, device=sigma.device
        )
        g = grads[f"{n}.weight"].reshape(m.weight.shape[0], -1).double()
        if m.bias is not None:
            g = torch.cat([g, grads[f"{n}.bias"].double()[:, None]], dim=1)
        d = torch.linalg.solve(sigma, g.T).T  # G Sigma^{-1}, Sigma symmetric
        grads[f"{n}.weight"] = d[:, : m.weight[0].numel()].reshape(m.weight.shape)  # kept in float64
        if m.bias is not None:
            grads[f"{n}.bias"] = d[:, -1]
    return grads


@dataclasses.dataclass
class GradientMatcher(Matcher):
    """App. B: permutations from the (FOOF-preconditioned) first-order loss change, no training needed.

    preconditioner: "foof" (the paper's) or "none" (the raw gradient). damping: relative to
    the mean eigenvalue of E[x x^T]. The paper gives no value; 1 is the best of 1e-3 / 0.1 / 1 / 10 on
    untrained Fashion-MNIST MLP pairs, chosen on training images apart from the matching ones
    (benchmarks/results/foof-damping-2026-11-27/).
    Gradients are of the mean loss over `num_examples` examples of `data` (a subset fixed by
    `seed`, which also orders the later sweeps).
    """

    name: ClassVar[str] = "gradient"
    preconditioner: str = "foof"
    damping: float = 1.0
    num_examples: int | None = 10000
    batch_size: int = 1000
    max_iter: int = 100
    seed: int = 0

    def __post_init__(self):
        check_choice("preconditioner", self.preconditioner, PRECONDITIONERS)
        if not self.damping > 0 and self.preconditioner == "foof":
            raise ValueError(f"damping must be > 0, got {self.damping}")

    def match(self, model_a: nn.Module, model_b: nn.Module, data=None) -> Permutations:
        spec = check_same_architecture(model_a, model_b)
        check_matching_data(data, model_a)
        split = data.subset(self.num_examples, self.seed)
        if bool((split.labels < 0).any()):
            raise ValueError(
                "the gradient matcher needs labels (its objective is the training loss's gradient); "
                "pass a dataset with a 'label' column (a folder of images: one subfolder per class)"
            )
        num_labels = getattr(getattr(model_a, "config", None), "num_labels", None)
        if num_labels is not None and bool((split.labels >= num_labels).any()):
            raise ValueError(
                f"the data's labels go up to {int(split.labels.max())}, but the models have {num_labels} "
                "classes; pass data labelled with the models' classes (label ids 0.."
                f"{num_labels - 1}, in the order of config.id2label)"
            )
        directions = [
            update_directions(m, split.pixel_values, split.labels, self.preconditioner, self.damping, self.batch_size)
            for m in (model_a, model_b)
        ]
        g_a, g_b = directions[0], {k: v.to(model_device(model_a)) for k, v in directions[1].items()}
        theta_a = model_a.state_dict()
        theta_b = {k: v.to(model_device(model_a)) for k, v in model_b.state_dict().items()}
        pairs_a = [{k: -v for k, v in g_a.items()}, {k: -v for k, v in theta_a.items()}]
        pairs_b = [theta_b, g_b]
        perms, similarities = solve_linear_matching(
            spec, pairs_a, pairs_b, self.max_iter, self.seed, bottom_up_first=True
        )
        return Permutations(perms, self._info(similarities, perms, split))
