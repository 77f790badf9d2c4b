"""Linear-interpolation curves, evaluated for all lambdas in one batched pass.

A curve point is the network (1 - lambda) * theta_a + lambda * theta_b (the convention of
`barrier.loss_barrier`). Every floating-point entry of the state dict is interpolated, BatchNorm
running statistics included, and models are evaluated in eval mode: that is plain interpolation,
as in the paper. Resetting or repairing BN statistics (REPAIR) is a separate, later step.

Speed: the P parameter sets of a curve (or of a plane grid) are stacked along a leading axis and
run with `torch.vmap` over `torch.func.functional_call`, so one data chunk passes through all P
networks as batched matmuls / grouped convolutions; data are index slices of tensors already on the
device, never a Python loop per sample. If vmap cannot run a model, we fall back to a loop over the
parameter sets (with a warning) and give the same numbers, only slower.

Reported per network, over the whole split:
- `loss`: the model's own training objective (`config.loss`: cross-entropy or MSE), via its
  `compute_loss`, so the curve shows the quantity the nets were trained on;
- `acc`: top-1 accuracy;
- `nll`: mean cross-entropy at temperature 1 (equals `loss` for cross-entropy models);
- `nll_tempered`, `temperature`: min over T > 0 of the mean cross-entropy of logits / T, and that T.
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

StateDict = Mapping[str, torch.Tensor]

DEFAULT_BATCH_SIZE = 1000   # examples per forward pass; memory ~ sets x batch_size x widest layer
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
        raise ValueError(f"{what}: state dicts have different entries (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}); are both nets of the same architecture?")
    for k, v in reference.items():
        if tuple(v.shape) != tuple(other[k].shape):
            raise ValueError(f"{what}: {k!r} has shape {tuple(v.shape)} in one and {tuple(other[k].shape)} "
                             "in the other; are both nets of the same architecture and width?")


def interpolate_state_dicts(sd_a: StateDict, sd_b: StateDict, lam: float) -> dict[str, torch.Tensor]:
    """(1 - lam) * sd_a + lam * sd_b for floating entries; integer buffers (BN step counters) from sd_a."""
    sd_a, sd_b = _as_state_dict(sd_a), _as_state_dict(sd_b)
    _check_compatible(sd_a, sd_b, "interpolate_state_dicts")
    lam = float(lam)
    return {k: (1.0 - lam) * a + lam * sd_b[k].to(a) if a.is_floating_point() else a.clone()
            for k, a in sd_a.items()}


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
        stacked = torch.stack([b[k].to(ref) for b in bases])                 # (K, ...)
        combo = torch.tensordot(coeffs.to(ref), stacked, dims=([1], [0]))   # (P, ...)
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
    s0, s1, s2 = e.sum(1), (e * shifted).sum(1), (e * shifted * shifted).sum(1)
    mean = s1 / s0
    return s0.log().mean(-1), mean, (s2 / s0 - mean * mean).mean(-1)


def tempered_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """min over T > 0 of the mean NLL of logits / T per parameter set, and the minimising T.

    logits (P, N, C). NLL(beta * logits) is convex in beta = 1/T (log-sum-exp of affine functions
    minus a linear term), so its derivative is monotone: a safeguarded Newton search for the root,
    bisecting in log(beta) over [-7, 7] whenever a Newton step leaves the bracket, converges in a
    handful of passes over the logits (a fixed grid or golden section needs ~40). T = 1 is also
    tried, so the result is never above the untempered NLL.
    """
    logits = logits.float()
    row_max = logits.amax(-1)                                                        # (P, N)
    target = logits.gather(-1, labels.expand(logits.shape[:2]).unsqueeze(-1)).squeeze(-1)
    shifted = (logits - row_max[..., None]).transpose(1, 2).contiguous()              # (P, C, N), <= 0
    gap = (row_max - target).mean(-1)                                                 # (P,), >= 0

    def nll(beta):
        return _tempering_terms(shifted, beta)[0] + beta * gap

    n_sets = logits.shape[0]
    lo = torch.full((n_sets,), -7.0, device=logits.device)
    hi = torch.full((n_sets,), 7.0, device=logits.device)
    u = torch.zeros(n_sets, device=logits.device)                                     # log beta, start at T = 1
    for _ in range(60):
        beta = u.exp()
        _, mean, curvature = _tempering_terms(shifted, beta)
        grad = mean.mean(-1) + gap                # d NLL / d beta = E_p[z] - z_y, averaged
        lo, hi = torch.where(grad < 0, u, lo), torch.where(grad < 0, hi, u)
        newton = beta - grad / curvature
        ok = torch.isfinite(newton) & (newton > lo.exp()) & (newton < hi.exp())
        u_next = torch.where(ok, newton.clamp_min(1e-30).log(), (lo + hi) / 2)
        done = bool(((u_next - u).abs() < 1e-6).all())
        u = u_next
        if done:
            break
    ones = torch.ones_like(u)
    beta = torch.where(nll(u.exp()) < nll(ones), u.exp(), ones)
    return nll(beta), 1.0 / beta


def metrics_from_logits(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    """Per-set metrics of stacked logits (P, N, C) on one split; see the module docstring."""
    loss = torch.vmap(lambda z: model.compute_loss(z, labels))(logits) if hasattr(model, "compute_loss") \
        else torch.vmap(lambda z: F.cross_entropy(z, labels))(logits)
    nll = torch.vmap(lambda z: F.cross_entropy(z, labels))(logits)
    acc = (logits.argmax(-1) == labels).float().mean(-1)
    nll_t, temperature = tempered_nll(logits, labels)
    return {"loss": loss.tolist(), "acc": acc.tolist(), "nll": nll.tolist(),
            "nll_tempered": nll_t.tolist(), "temperature": temperature.tolist()}


def evaluate_model(model: nn.Module, split: TensorSplit, batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, float]:
    """{loss, acc, nll, nll_tempered, temperature} of one model on a whole split, by plain forward passes.

    This is the reference the batched path is checked against; the model runs on its own device.
    """
    device = next(model.parameters()).device
    with _eval_mode(model):
        logits = torch.cat([model(pixel_values=split.pixel_values[i:i + batch_size].to(device), return_dict=False)[0]
                            for i in range(0, len(split), batch_size)])
    metrics = metrics_from_logits(model, logits[None], split.labels.to(device))
    return {k: v[0] for k, v in metrics.items()}


def _forward_sets(model: nn.Module, stacked: dict, fixed: dict, x: torch.Tensor, use_vmap: bool) -> torch.Tensor:
    """Logits (P, B, C) of the P stacked parameter sets on one data chunk x (B, ...)."""
    def forward(params, inputs):
        return functional_call(model, (params, fixed), (inputs,), {"return_dict": False})[0]
    if use_vmap:
        return torch.vmap(forward, in_dims=(0, None))(stacked, x)
    n_sets = next(iter(stacked.values())).shape[0]
    return torch.stack([forward({k: v[p] for k, v in stacked.items()}, x) for p in range(n_sets)])


def evaluate_combinations(model: nn.Module, bases: Sequence[StateDict], coeffs: torch.Tensor,
                          splits: Mapping[str, TensorSplit], batch_size: int = DEFAULT_BATCH_SIZE,
                          sets_per_pass: int = DEFAULT_SETS_PER_PASS) -> dict[str, dict[str, list[float]]]:
    """Metrics of the networks sum_k coeffs[p, k] * bases[k], p = 0..P-1, on every split.

    `model` only supplies the architecture (its own weights are not used). Returns
    {split: {metric: [P values]}} with the metrics of `metrics_from_logits`.
    """
    bases = [_as_state_dict(b) for b in bases]
    reference = dict(model.state_dict())
    for i, b in enumerate(bases):
        _check_compatible(reference, b, f"parameter set {i} vs the model")
    coeffs = torch.as_tensor(coeffs, dtype=torch.float64)
    if coeffs.ndim != 2 or coeffs.shape[1] != len(bases):
        raise ValueError(f"coeffs must have shape (P, {len(bases)}), got {tuple(coeffs.shape)}")
    results = {name: {} for name in splits}
    use_vmap = True
    with _eval_mode(model):
        for name, split in splits.items():
            device = split.pixel_values.device
            on_device = [{k: v.to(device) for k, v in b.items()} for b in bases]
            for start in range(0, coeffs.shape[0], sets_per_pass):
                stacked = combine_state_dicts(on_device, coeffs[start:start + sets_per_pass])
                fixed = {k: v for k, v in on_device[0].items() if k not in stacked}
                chunks = []
                for i in range(0, len(split), batch_size):
                    x = split.pixel_values[i:i + batch_size]
                    if use_vmap:
                        try:
                            chunks.append(_forward_sets(model, stacked, fixed, x, use_vmap=True))
                            continue
                        except (RuntimeError, NotImplementedError, ValueError) as err:
                            warnings.warn(f"torch.vmap could not run {type(model).__name__} ({err}); "
                                          "evaluating the parameter sets one by one instead (same numbers, slower)")
                            use_vmap = False
                    chunks.append(_forward_sets(model, stacked, fixed, x, use_vmap=False))
                metrics = metrics_from_logits(model, torch.cat(chunks, dim=1), split.labels)
                for key, values in metrics.items():
                    results[name].setdefault(key, []).extend(values)
    return results


def evaluate_curve(model: nn.Module, sd_a, sd_b, lambdas: Sequence[float] | None = None,
                   splits: Mapping[str, TensorSplit] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                   sets_per_pass: int = DEFAULT_SETS_PER_PASS) -> dict[str, dict[str, list[float]]]:
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
