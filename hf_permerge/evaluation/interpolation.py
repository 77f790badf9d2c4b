"""Linear-interpolation curves, evaluated for all lambdas in one batched pass.

A curve point is the network (1 - lambda) * theta_a + lambda * theta_b (the convention of
`barrier.loss_barrier`). Every floating-point entry of the state dict is interpolated, BatchNorm
running statistics included, and models are evaluated in eval mode: that is plain interpolation,
as in the paper. Resetting or repairing BN statistics (REPAIR) is a separate, later step.

Speed: the P parameter sets of a curve (or of a plane grid) are stacked along a leading axis and
run with `torch.vmap` over `torch.func.functional_call`, so one data chunk passes through all P
networks as batched matmuls / grouped convolutions; data are index slices of tensors already on the
device, never a Python loop per sample. Conv nets on the CPU loop over the parameter sets instead (grouped
convolutions are slow there); if vmap cannot run a model, we fall back to that loop too (with a warning):
the same numbers either way. Our MLP takes a faster
path (`_mlp_logits`): its first layer runs once per endpoint instead of once per lambda.

Reported per network, over the whole split:
- `loss`: the model's own training objective (`config.loss`: cross-entropy or MSE), via its
  `compute_loss`, so the curve shows the quantity the nets were trained on;
- `acc`: top-1 accuracy;
- `nll`: mean cross-entropy at temperature 1 (equals `loss` for cross-entropy models);
- `nll_tempered`, `temperature`: min over T > 0 of the mean cross-entropy of logits / T, and that T
  (None where it is infinite: a net no better than uniform guessing; reports are strict JSON).
  Averaged networks are often badly calibrated (logits shrink), which inflates the NLL although the
  predictions are good; the optimally tempered NLL removes that effect, as the authors' code reports.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..data.tensors import TensorSplit
from ..models import PermMLPForImageClassification
from ..models.modeling_perm_mlp import mlp_forward, mlp_layer_names

StateDict = Mapping[str, torch.Tensor]

DEFAULT_BATCH_SIZE = 1000  # examples per forward pass; memory ~ sets x batch_size x widest layer
CPU_CONV_BATCH = 128
"""Images per pass for conv nets on the CPU: their activations then stay in cache (a 32-32-avg-64-64 curve: 2.3x
faster at 64-250 images per pass than at 1000-10000; BENCHMARKS.md)."""
DEFAULT_SETS_PER_PASS = 16  # parameter sets stacked per pass (a whole 11-point curve fits in one)


def default_lambdas(n: int = 11) -> list[float]:
    """n evenly spaced lambdas with exact endpoints 0.0 and 1.0 (the barrier needs both)."""
    if n < 2:
        raise ValueError(f"a curve needs at least its two endpoints, got n={n}")
    return [i / (n - 1) for i in range(n)]


def _as_state_dict(x) -> dict[str, torch.Tensor]:
    return dict(x.state_dict()) if isinstance(x, nn.Module) else dict(x)


def _check_compatible(reference: StateDict, other: StateDict, what: str) -> None:
    """Same keys and shapes, or a clear error naming the first difference (mismatched architectures)."""
    missing, extra = set(reference) - set(other), set(other) - set(reference)
    if missing or extra:
        raise ValueError(
            f"{what}: state dicts have different entries (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}); are both nets of the same architecture?"
        )
    for k, v in reference.items():
        if tuple(v.shape) != tuple(other[k].shape):
            raise ValueError(
                f"{what}: {k!r} has shape {tuple(v.shape)} in one and {tuple(other[k].shape)} "
                "in the other; are both nets of the same architecture and width?"
            )


def interpolate_state_dicts(sd_a: StateDict, sd_b: StateDict, lam: float) -> dict[str, torch.Tensor]:
    """(1 - lam) * sd_a + lam * sd_b for floating entries; integer buffers (BN step counters) from sd_a."""
    sd_a, sd_b = _as_state_dict(sd_a), _as_state_dict(sd_b)
    _check_compatible(sd_a, sd_b, "interpolate_state_dicts")
    lam = float(lam)
    return {k: (1.0 - lam) * a + lam * sd_b[k].to(a) if a.is_floating_point() else a.clone() for k, a in sd_a.items()}


def combine_state_dicts(bases: Sequence[StateDict], coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
    """P parameter sets sum_k coeffs[p, k] * bases[k], stacked on a leading axis of size P.

    Curves use two bases (coefficients 1 - lambda, lambda); the plane uses three. Integer entries are
    not stacked: they come from bases[0]. A BN running variance is clamped at 0, since an affine
    combination outside the convex hull (the plane's margins) could make it negative.
    """
    out = {}
    for k, ref in bases[0].items():
        if not ref.is_floating_point():
            continue
        stacked = torch.stack([b[k].to(ref) for b in bases])  # (K, ...)
        combo = torch.tensordot(coeffs.to(ref), stacked, dims=([1], [0]))  # (P, ...)
        out[k] = combo.clamp_min_(0.0) if k.endswith("running_var") else combo
    return out


@contextmanager
def _eval_mode(model: nn.Module):
    """Evaluate in eval mode (BN uses running stats, no dropout) and restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _tempering_terms(shifted: torch.Tensor, beta: torch.Tensor):
    """Per set: sum_n log sum_c exp(beta * shifted), and the NLL's first and second derivative in beta.

    shifted = logits - row max, laid out (P, C, N) so the reductions over classes vectorise over N.
    """
    e = torch.exp(shifted * beta[:, None, None])
    es = e * shifted
    s0, s1, s2 = e.sum(1), es.sum(1), es.mul_(shifted).sum(1)
    mean = s1 / s0
    return s0.log().mean(-1), mean, (s2 / s0 - mean * mean).mean(-1)


def tempered_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """min over T > 0 of the mean NLL of logits / T per parameter set, and the minimising T.

    logits (P, N, C). NLL(beta * logits) is convex in beta = 1/T (log-sum-exp of affine functions
    minus a linear term), so its derivative is monotone: a safeguarded Newton search for the root,
    bisecting in log(beta) over [-7, 7] whenever a Newton step leaves the bracket, converges in a
    handful of passes over the logits (a fixed grid or golden section needs ~40). T = 1 is also
    tried, so the result is never above the untempered NLL. A net no better than uniform guessing
    gets T = inf and NLL = log(num classes); a net with every example right gets T = e^-7.
    """
    logits = logits.float()
    row_max = logits.amax(-1)  # (P, N)
    target = logits.gather(-1, labels.expand(logits.shape[:2]).unsqueeze(-1)).squeeze(-1)
    shifted = (logits - row_max[..., None]).transpose(1, 2).contiguous()  # (P, C, N), <= 0
    gap = (row_max - target).mean(-1)  # (P,), >= 0

    def nll(beta):
        return _tempering_terms(shifted, beta)[0] + beta * gap

    def grad_and_curvature(u):
        _, mean, curvature = _tempering_terms(shifted, u.exp())
        return mean.mean(-1) + gap, curvature  # d NLL / d beta = E_p[z] - z_y, averaged; its derivative

    lo = torch.full((logits.shape[0],), -7.0, device=logits.device)
    hi = -lo
    grad_lo, grad_hi = grad_and_curvature(lo)[0], grad_and_curvature(hi)[0]
    at_bound = (grad_lo >= 0) | (grad_hi <= 0)  # optimum at T = e^7 (useless net) or T = e^-7 (all correct)
    u = torch.zeros_like(lo)  # start at T = 1
    for _ in range(60):
        grad, curvature = grad_and_curvature(u)
        lo, hi = torch.where(grad < 0, u, lo), torch.where(grad < 0, hi, u)
        newton = u.exp() - grad / curvature
        ok = torch.isfinite(newton) & (newton > lo.exp()) & (newton < hi.exp())
        u_next = torch.where(ok, newton.clamp_min(1e-30).log(), (lo + hi) / 2)
        step, u = (u_next - u).abs(), u_next
        if bool((at_bound | (step < 1e-4) | (hi - lo < 1e-4)).all()):  # T to 1e-4 relative
            break
    beta = torch.where(grad_hi <= 0, hi.exp(), u.exp())
    beta = torch.where(grad_lo >= 0, torch.zeros_like(beta), beta)  # no better than uniform: T = inf, log C
    beta = torch.where(nll(beta) < nll(torch.ones_like(beta)), beta, torch.ones_like(beta))
    return nll(beta), 1.0 / beta


def metrics_from_logits(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    """Per-set metrics of stacked logits (P, N, C) on one split; see the module docstring."""
    nll = (
        F.cross_entropy(logits.flatten(0, 1), labels.repeat(len(logits)), reduction="none")
        .view(len(logits), -1)
        .mean(-1)
    )
    loss = torch.stack([model.compute_loss(z, labels) for z in logits]) if hasattr(model, "compute_loss") else nll
    acc = (logits.argmax(-1) == labels).float().mean(-1)
    nll_t, temperature = tempered_nll(logits, labels)
    return {
        "loss": loss.tolist(),
        "acc": acc.tolist(),
        "nll": nll.tolist(),
        "nll_tempered": nll_t.tolist(),
        "temperature": [t if math.isfinite(t) else None for t in temperature.tolist()],
    }


def evaluate_model(model: nn.Module, split: TensorSplit, batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, float]:
    """{loss, acc, nll, nll_tempered, temperature} of one model on a whole split, by plain forward passes.

    This is the reference the batched path is checked against; the model runs on its own device.
    """
    device = next(model.parameters()).device
    with _eval_mode(model):
        logits = torch.cat(
            [
                model(pixel_values=split.pixel_values[i : i + batch_size].to(device), return_dict=False)[0]
                for i in range(0, len(split), batch_size)
            ]
        )
    metrics = metrics_from_logits(model, logits[None], split.labels.to(device))
    return {k: v[0] for k, v in metrics.items()}


def _vmap_logits(model: nn.Module, stacked: dict, fixed: dict, x: torch.Tensor) -> torch.Tensor:
    """Logits (P, B, C) of P stacked parameter sets on one data chunk x (B, ...) in one vmapped call."""

    def forward(params, inputs):
        return functional_call(model, (params, fixed), (inputs,), {"return_dict": False})[0]

    return torch.vmap(forward, in_dims=(0, None))(stacked, x)


def _one_by_one(stacked: dict, device: torch.device) -> list[dict]:
    """The P parameter sets of `stacked` one by one, made once per pass; on the CPU, conv weights in
    channels-last, oneDNN's fastest layout (the images are converted to match in `_looped_logits`)."""
    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    n_sets = next(iter(stacked.values())).shape[0]
    return [
        {k: v[p].contiguous(memory_format=layout) if v.ndim == 5 else v[p] for k, v in stacked.items()}
        for p in range(n_sets)
    ]


def _looped_logits(model: nn.Module, per_set: list[dict], fixed: dict, x: torch.Tensor) -> torch.Tensor:
    """Logits (P, B, C): the model's forward once per parameter set (same numbers as `_vmap_logits`)."""
    if x.ndim == 4 and x.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    return torch.stack([functional_call(model, (params, fixed), (x,), {"return_dict": False})[0] for params in per_set])


def _vmap_pays(model: nn.Module, splits: Mapping[str, TensorSplit]) -> bool:
    """vmap turns a convolution over P parameter sets into one grouped convolution: on the CPU that ran an
    11-point curve of a 32-32-avg-64-64 CNN 4x slower than one plain convolution per set (BENCHMARKS.md), so
    conv nets on the CPU loop over the sets; everything else, and every GPU, takes vmap."""
    on_cpu = all(split.pixel_values.device.type == "cpu" for split in splits.values())
    return not (on_cpu and any(isinstance(m, nn.Conv2d) for m in model.modules()))


def _mlp_first_layer(bases: Sequence[StateDict]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The K bases' first-layer weights (K*H, D) and biases stacked, made once per pass."""
    weight = torch.cat([b["layers.0.weight"] for b in bases])
    bias = torch.cat([b["layers.0.bias"] for b in bases])[:, None] if "layers.0.bias" in bases[0] else None
    return weight, bias


def _mlp_logits(first_layer: tuple, coeffs: torch.Tensor, stacked: dict, depth: int, x: torch.Tensor) -> torch.Tensor:
    """PermMLP fast path: the model's forward (`mlp_forward`) over P parameter sets, same numbers as `_vmap_logits`
    up to float rounding.

    The first layer is linear in its weights and sees the same x in every set, so it runs once per
    basis (K = 2 for a curve, 3 for the plane) and its outputs are mixed, instead of running once
    per set: that is most of the work of a 1-hidden-layer net and about half of a 2x512 one.
    Activations are kept as (P, H, B), so the mixing is one GEMM (P x K) @ (K x H*B) and each
    later layer one batched GEMM W_p @ h_p with the bias fused (baddbmm).
    """
    (n_sets, n_bases), batch = coeffs.shape, x.shape[0]

    def linear(name, h):
        if name == "layers.0":  # h: the images (B, D)
            weight, bias = first_layer
            first = weight @ h.T if bias is None else torch.addmm(bias, weight, h.T)  # (K*H, B)
            return (coeffs.to(first) @ first.view(n_bases, -1)).view(n_sets, -1, batch)  # (P, H, B)
        weight, bias = stacked[f"{name}.weight"], stacked.get(f"{name}.bias")
        return torch.bmm(weight, h) if bias is None else torch.baddbmm(bias[:, :, None], weight, h)

    logits = mlp_forward(linear, lambda i, h: h.relu_(), mlp_layer_names(depth), x.flatten(1))
    return logits.transpose(1, 2)  # (P, B, C)


def evaluate_combinations(
    model: nn.Module,
    bases: Sequence[StateDict],
    coeffs: torch.Tensor,
    splits: Mapping[str, TensorSplit],
    batch_size: int = DEFAULT_BATCH_SIZE,
    sets_per_pass: int = DEFAULT_SETS_PER_PASS,
) -> dict[str, dict[str, list[float]]]:
    """Metrics of the networks sum_k coeffs[p, k] * bases[k], p = 0..P-1, on every split.

    `model` only supplies the architecture (its own weights are not used). Returns
    {split: {metric: [P values]}} with the metrics of `metrics_from_logits`. Memory is bounded by
    sets_per_pass x batch_size x the widest activation, plus sets_per_pass parameter copies.
    """
    bases = [_as_state_dict(b) for b in bases]
    reference = dict(model.state_dict())
    for i, b in enumerate(bases):
        _check_compatible(reference, b, f"parameter set {i} vs the model")
    coeffs = torch.as_tensor(coeffs, dtype=torch.float64)
    if coeffs.ndim != 2 or coeffs.shape[1] != len(bases) or not torch.isfinite(coeffs).all():
        raise ValueError(f"coeffs must be finite with shape (P, {len(bases)}), got {tuple(coeffs.shape)}")
    fast_mlp = type(model) is PermMLPForImageClassification
    use_vmap = _vmap_pays(model, splits)
    if not use_vmap and not fast_mlp:
        batch_size = min(batch_size, CPU_CONV_BATCH)
    results = {name: {} for name in splits}
    with _eval_mode(model):
        for name, split in splits.items():
            device = split.pixel_values.device
            on_device = [{k: v.to(device) for k, v in b.items()} for b in bases]
            for start in range(0, coeffs.shape[0], sets_per_pass):
                chunk_coeffs = coeffs[start : start + sets_per_pass]
                if fast_mlp:  # its first layer is mixed from the bases' outputs, never stacked
                    first_layer = _mlp_first_layer(on_device)
                    stacked = combine_state_dicts(
                        [{k: v for k, v in b.items() if not k.startswith("layers.0.")} for b in on_device], chunk_coeffs
                    )
                else:
                    stacked = combine_state_dicts(on_device, chunk_coeffs)
                    fixed = {k: v for k, v in on_device[0].items() if k not in stacked}
                    per_set = None if use_vmap else _one_by_one(stacked, device)
                chunks = []
                for i in range(0, len(split), batch_size):
                    x = split.pixel_values[i : i + batch_size]
                    if fast_mlp:
                        chunks.append(_mlp_logits(first_layer, chunk_coeffs, stacked, model.config.depth, x))
                        continue
                    if use_vmap:
                        try:
                            chunks.append(_vmap_logits(model, stacked, fixed, x))
                            continue
                        except (RuntimeError, NotImplementedError, ValueError) as err:
                            warnings.warn(
                                f"torch.vmap could not run {type(model).__name__} ({err}); "
                                "evaluating the parameter sets one by one instead (same numbers, slower)",
                                stacklevel=2,
                            )
                            use_vmap = False
                            per_set = _one_by_one(stacked, device)
                    chunks.append(_looped_logits(model, per_set, fixed, x))
                metrics = metrics_from_logits(model, torch.cat(chunks, dim=1), split.labels)
                for key, values in metrics.items():
                    results[name].setdefault(key, []).extend(values)
    return results


def evaluate_curve(
    model: nn.Module,
    sd_a,
    sd_b,
    lambdas: Sequence[float] | None = None,
    splits: Mapping[str, TensorSplit] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    sets_per_pass: int = DEFAULT_SETS_PER_PASS,
) -> dict[str, dict[str, list[float]]]:
    """Metrics along (1 - lambda) * sd_a + lambda * sd_b, all lambdas batched.

    sd_a / sd_b: state dicts or models of `model`'s architecture. Returns
    {split: {"loss", "acc", "nll", "nll_tempered", "temperature": [one value per lambda]}}.
    """
    if not splits:
        raise ValueError("evaluate_curve needs splits, e.g. {'test': load_tensors('fashion_mnist', 'test')}")
    lam = torch.tensor(default_lambdas() if lambdas is None else list(lambdas), dtype=torch.float64)
    if lam.ndim != 1 or len(lam) == 0:
        raise ValueError(f"lambdas must be a non-empty flat sequence, got {lambdas!r}")
    coeffs = torch.stack([1.0 - lam, lam], dim=1)
    return evaluate_combinations(model, [sd_a, sd_b], coeffs, splits, batch_size, sets_per_pass)
