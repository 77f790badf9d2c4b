"""The paper's Fig. 1 heat maps: metrics on the plane through theta_0, theta_1 and pi(theta_1).

Gram-Schmidt gives an orthonormal basis of the plane, e1 along theta_1 - theta_0 and e2 along the
part of pi(theta_1) - theta_0 orthogonal to it, so distances and angles on the map are the true
ones in parameter space. The point (u, v) is theta_0 + u e1 + v e2, which is an affine combination
of the three nets; the grid is therefore evaluated by the same batched evaluator as the curves
(`evaluate_combinations`), every grid point being one parameter set.

The plane spans every floating-point state entry, BatchNorm running statistics included (as the
curves interpolate them); a running variance that turns negative in the margins is clamped at 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..data.tensors import TensorSplit
from .interpolation import DEFAULT_BATCH_SIZE, _as_state_dict, _check_compatible, evaluate_combinations

POINT_NAMES = ("theta_0", "theta_1", "pi_theta_1")


def _flat(sd: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).double().cpu() for v in sd.values() if v.is_floating_point()])


def plane_coordinates(theta_0, theta_1, theta_1_permuted) -> dict[str, tuple[float, float]]:
    """(u, v) of the three nets in the Gram-Schmidt basis: theta_0 at the origin, theta_1 on the u axis."""
    sds = [_as_state_dict(t) for t in (theta_0, theta_1, theta_1_permuted)]
    for name, sd in zip(POINT_NAMES[1:], sds[1:]):
        _check_compatible(sds[0], sd, f"plane: theta_0 vs {name}")
    origin, p1, p2 = (_flat(sd) for sd in sds)
    d1, d2 = p1 - origin, p2 - origin
    n1 = float(d1.norm())
    if n1 == 0.0:
        raise ValueError("plane: theta_0 and theta_1 are identical, so they span no plane")
    a = float(d2 @ d1) / n1
    n2 = float((d2 - a * d1 / n1).norm())
    if n2 <= 1e-9 * max(n1, float(d2.norm())):
        raise ValueError(
            "plane: pi(theta_1) lies on the line through theta_0 and theta_1 "
            "(is the permutation the identity?), so the three nets span no plane"
        )
    return {"theta_0": (0.0, 0.0), "theta_1": (n1, 0.0), "pi_theta_1": (a, n2)}


def plane_coefficients(uv: torch.Tensor, points: Mapping[str, tuple[float, float]]) -> torch.Tensor:
    """Weights (P, 3) on (theta_0, theta_1, pi(theta_1)) of the points uv (P, 2) of the plane."""
    n1, (a, n2) = points["theta_1"][0], points["pi_theta_1"]
    u, v = uv[:, 0].double(), uv[:, 1].double()
    c1 = u / n1 - v * a / (n1 * n2)
    c2 = v / n2
    return torch.stack([1.0 - c1 - c2, c1, c2], dim=1)


def evaluate_plane(
    model: nn.Module,
    theta_0,
    theta_1,
    theta_1_permuted,
    splits: Mapping[str, TensorSplit],
    resolution: int = 21,
    margin: float = 0.2,
    batch_size: int = DEFAULT_BATCH_SIZE,
    sets_per_pass: int = 32,
) -> dict:
    """Metrics on a resolution x resolution grid covering the three nets plus `margin` of each side's span.

    Returns {"u": [...], "v": [...], "points": {"theta_0" | "theta_1" | "pi_theta_1": (u, v)},
    "at_points": {point: {split: {metric: value}}} (the three nets themselves), <split>: {metric: grid}, ...} where grid[j][i] is the metric at (u[i], v[j]) (rows are v, as
    `imshow(origin="lower")` draws them) and the metrics are those of `evaluate_curve`. Cost:
    resolution**2 networks per split, so pass a test subset or a coarse grid for quick looks.
    """
    clash = {"u", "v", "points", "at_points"} & set(splits)
    if clash:
        raise ValueError(f"split names {sorted(clash)} clash with the plane's own keys; rename the split")
    if resolution < 2:
        raise ValueError(f"resolution must be >= 2 grid points per axis, got {resolution}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0 (a fraction of the span), got {margin}")
    points = plane_coordinates(theta_0, theta_1, theta_1_permuted)
    us, vs = [p[0] for p in points.values()], [p[1] for p in points.values()]

    def axis(lo, hi):
        pad = margin * (hi - lo)
        return torch.linspace(lo - pad, hi + pad, resolution, dtype=torch.float64)

    u, v = axis(min(us), max(us)), axis(min(vs), max(vs))
    vv, uu = torch.meshgrid(v, u, indexing="ij")  # rows: v, columns: u
    coeffs = plane_coefficients(torch.stack([uu.reshape(-1), vv.reshape(-1)], dim=1), points)
    # the three nets themselves ride along as the last three sets: the map's anchors, exactly
    flat = evaluate_combinations(
        model,
        [theta_0, theta_1, theta_1_permuted],
        torch.cat([coeffs, torch.eye(3, dtype=coeffs.dtype)]),
        splits,
        batch_size=batch_size,
        sets_per_pass=sets_per_pass,
    )
    cells = resolution * resolution
    grids = {
        name: {
            k: [vals[r * resolution : (r + 1) * resolution] for r in range(resolution)] for k, vals in metrics.items()
        }
        for name, metrics in flat.items()
    }
    at_points = {
        name: {split: {k: vals[cells + i] for k, vals in metrics.items()} for split, metrics in flat.items()}
        for i, name in enumerate(POINT_NAMES)
    }
    return {"u": u.tolist(), "v": v.tolist(), "points": points, "at_points": at_points, **grids}
