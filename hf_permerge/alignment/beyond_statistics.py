"""Activation statistics for the matchers beyond permutations: paired moments of two models' module outputs over
tokens, and what the matcher reads from them (the stream's cross-covariance, each head's moments, the cosines that
give signed permutations)."""

from __future__ import annotations

import torch

from .activation import forward_batches, group_columns, units_as_columns
from .base import eval_mode
from .folding import norms_on, owner, stream_groups
from .hungarian import solve_assignment
from .per_head import is_output
from .transforms import Transforms


def paired_moments(model_a, model_b, taps: dict, data, batch_size: int = 32) -> dict:
    """key -> (sum a b^T, sum b b^T, sum a^2) over the data's tokens, for `taps`: key -> (module, columns), where
    columns(output, token mask) gives a module's output as (samples, units); a and b are the two models' columns."""
    sums: dict = {}
    held: dict = {}
    names = {name for name, _ in taps.values()}
    hooks = [
        m.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n, side=side: held.__setitem__((side, n), o))
        for side, m in (("a", model_a), ("b", model_b))
        for n in names
    ]
    try:
        with torch.no_grad(), eval_mode(model_a, model_b):
            for inputs, mask in forward_batches(data, [model_a, model_b], batch_size):
                model_a(**inputs[0])
                model_b(**inputs[1])
                for key, (name, columns) in taps.items():
                    a, b = (columns(held[(s, name)], mask).double() for s in ("a", "b"))
                    cab, cbb, saa = sums.get(key, (0.0, 0.0, 0.0))
                    sums[key] = (cab + a.T @ b, cbb + b.T @ b, saa + (a**2).sum(0))
    finally:
        for h in hooks:
            h.remove()
    return sums


def stream_cross(model_a, model_b, spec, streams, data) -> dict[str, torch.Tensor]:
    """Per stream group, sum over tokens of a b^T of the outputs of every norm it passes (folded copies: x / rms(x)
    or the centred x / std(x), which an orthogonal map of the stream carries along)."""
    taps = {
        (g, n): (n, lambda o, mask: units_as_columns(o, -1, mask)) for g in streams for n in norms_on(model_a, spec, g)
    }
    out = {g: torch.zeros(spec[g].size, spec[g].size, dtype=torch.float64) for g in streams}
    for (g, _), (cab, _, _) in paired_moments(model_a, model_b, taps, data).items():
        out[g] += cab
    return out


def head_moments(model_a, model_b, spec, groups, data) -> dict:
    """Per group with per-head maps: (sum a b^T, sum b b^T, dual) of the activations of the side its activation module
    shows (`dual`: the side that takes M^-T, e.g. the keys)."""
    taps, dual = {}, {}

    def shows(group, entries) -> bool:  # the activation module is this side's projection (its part, if fused)
        start = None if group.activation_part is None else group.activation_part.start
        return any(owner(k) == group.activation and (p is None or p.start == start) for k, _, p in entries)

    for g, (primary, duals, _) in groups.items():
        group = spec[g]
        if group.activation is None or not (shows(group, primary) or shows(group, duals)):
            raise ValueError(f"source 'activation': no module carries the projections of group {g!r} alone")
        dual[g] = not shows(group, primary)
        taps[g] = (group.activation, lambda o, mask, group=group: group_columns(o, group, mask))
    return {g: (cab, cbb, dual[g]) for g, (cab, cbb, _) in paired_moments(model_a, model_b, taps, data).items()}


def signed_from_activations(model_a, model_b, spec, tr: Transforms, data) -> tuple[str, ...]:
    """Each signed group's permutation and signs from the cosines of its activations (set in `tr`; the groups solved
    are returned): the outputs that carry the signs (a stream's norms, RMSNorm(Sx) = S RMSNorm(x); a gated MLP's up
    projection) count by |cosine|, those that do not (the gate's nonlinearity) by their cosine; the sign of a
    matched pair is that of its signed cosine."""
    streams, taps = set(stream_groups(model_a, spec)), {}
    for g in tr.signs:
        group, plain = spec[g], tr.plain.get(g, frozenset())
        if g in streams:
            free = list(norms_on(model_a, spec, g))
        else:
            state = model_a.state_dict()
            free = [owner(k) for k, a in group.axes if (k, a) not in plain and is_output(model_a, k, a, state[k].ndim)]
        unsigned = [group.activation] if group.activation and g not in streams else []
        for name, signed in [(n, True) for n in dict.fromkeys(free)] + [(n, False) for n in unsigned]:
            taps[(g, name, signed)] = (name, lambda o, mask: units_as_columns(o, -1, mask))
    totals: dict = {}
    for (g, _, signed), (cab, cbb, saa) in paired_moments(model_a, model_b, taps, data).items():
        if cab.shape != (spec[g].size, spec[g].size):
            continue  # a fused projection's output carries other groups too: its part is not this tap's
        cos = cab / (saa[:, None] * torch.diagonal(cbb)[None, :]).clamp_min(1e-30).sqrt()
        plain_sum, free_sum = totals.get(g, (0.0, 0.0))
        totals[g] = (plain_sum, free_sum + cos) if signed else (plain_sum + cos, free_sum)
    for g, (plain_sum, free_sum) in totals.items():
        perm = solve_assignment(plain_sum + free_sum.abs())
        tr.perms[g] = perm
        tr.signs[g] = torch.where(free_sum[torch.arange(len(perm)), perm] < 0, -1.0, 1.0).double()
    return tuple(totals)
