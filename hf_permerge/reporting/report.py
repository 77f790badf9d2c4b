"""The evaluation of a pair: endpoints, interpolation curves, barriers, n-way averages, plane, schedules.

One function, `build_report`, turns a merger (aligned) and the `evaluation` config section into
the report.json dict (keys documented in docs/GUIDE.md, "Outputs"). All curves are evaluated batched.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from ..evaluation.barrier import loss_barrier
from ..evaluation.interpolation import evaluate_combinations, evaluate_model
from ..evaluation.plane import evaluate_plane
from ..precision import tf32_matmuls

logger = logging.getLogger("hf_permerge.reporting")

CHECKPOINTS = ("final", "init")
MODES = ("vanilla", "permuted")


def checkpoints_of(merger) -> list[str]:
    """The report's checkpoints the nets have: final and init for pairs of ours; final alone for models
    saved without their untrained init (any model from elsewhere)."""
    return [ck for ck in CHECKPOINTS if all(ck in s.checkpoints for s in merger.sources)]


def report_lambdas(n: int) -> list[float]:
    """n evenly spaced lambdas in [0, 1], always with the midpoint 0.5 (the paper's merged net)."""
    lams = {round(i / (n - 1), 10) for i in range(n)} | {0.5}
    return sorted(lams)


def _split_metrics(metrics: dict, idx: int) -> dict:
    return {k: metrics[k][idx] for k in ("loss", "acc", "nll", "nll_tempered")}


def checkpoint_step(name: str, total: int) -> int:
    return 0 if name == "init" else total if name == "final" else int(name.split("-", 1)[1])


def build_report(merger, evaluation, splits: dict, progress: bool = True) -> dict:
    """report.json as a dict. `splits`: {"test": TensorSplit, "train": TensorSplit (the fixed subset)}.
    Every forward pass runs in `evaluation.precision`."""
    precision = evaluation.precision
    with tf32_matmuls(precision):
        report = _build_report(merger, evaluation, splits, progress)
    report["precision"] = precision
    return report


def _build_report(merger, evaluation, splits: dict, progress: bool) -> dict:
    start = time.perf_counter()
    ev = evaluation
    lambdas = report_lambdas(ev.num_lambdas)
    mid = lambdas.index(0.5)
    template = merger.load(0)
    report: dict = {"lambdas": lambdas, "endpoints": [], "curves": {}, "midpoint": {}, "barrier": {}}
    curves_s = 0.0
    cks = checkpoints_of(merger)
    steps = [("endpoints", None)] + [(ck, mode) for ck in cks for mode in MODES]
    bar = tqdm(steps, desc="evaluate", disable=not progress, leave=False, mininterval=1.0)
    for what, mode in bar:
        bar.set_postfix_str(f"{what} {mode or ''}")
        if what == "endpoints":
            for i in range(merger.num_nets):
                report["endpoints"].append(
                    {
                        "net": i,
                        **{
                            s: _split_metrics({k: [v] for k, v in evaluate_model(merger.load(i), split).items()}, 0)
                            for s, split in splits.items()
                        },
                        **(
                            {
                                "init": {
                                    s: _split_metrics(
                                        {k: [v] for k, v in evaluate_model(merger.load(i, "init"), split).items()}, 0
                                    )
                                    for s, split in splits.items()
                                }
                            }
                            if "init" in cks
                            else {}
                        ),
                    }
                )
            continue
        ck = what
        curve_start = time.perf_counter()
        states = [merger.permuted_state(0, ck), merger.permuted_state(1, ck, permute=(mode == "permuted"))]
        res = _curve(
            template,
            states,
            lambdas,
            splits,
            ev.batch_size,
            [_endpoint_metrics(report["endpoints"][i], ck, splits) for i in (0, 1)],
        )
        curves_s += time.perf_counter() - curve_start
        curve = {"lambdas": lambdas}
        for s, m in res.items():
            curve[s] = {k: m[k] for k in ("loss", "acc", "nll", "nll_tempered")}
        report["curves"].setdefault(ck, {})[mode] = curve
        report["midpoint"].setdefault(ck, {})[mode] = {s: _split_metrics(res[s], mid) for s in res}
        report["barrier"].setdefault(ck, {})[mode] = {
            s: {
                "loss": loss_barrier(lambdas, res[s]["loss"], "loss").barrier,
                "acc": loss_barrier(lambdas, res[s]["acc"], "accuracy").barrier,
                "loss_lambda": loss_barrier(lambdas, res[s]["loss"], "loss").lam,
            }
            for s in res
        }
    if ev.repair:
        report["repair"] = {mode: repair_report(merger, splits, mode, report["endpoints"]) for mode in ev.repair}
    if ev.n_way and merger.num_nets > 2:
        report["n_way"] = n_way(merger, splits["test"], ev.batch_size, cks)
    if ev.plane:
        report["plane"] = plane_report(merger, splits, ev, cks)
    if ev.schedules or ev.current_perm:
        report["schedules"] = schedules(merger, splits["test"], ev)
    report["matching"] = {
        "matcher": merger.alignment.get("matcher"),
        "settings": merger.alignment.get("settings"),
        "checkpoint": merger.alignment.get("checkpoint"),
        "groups": merger.permutations[1].info.get("groups", {}),
    }
    report["timings"] = {
        "evaluate_s": time.perf_counter() - start,
        "curves_s": curves_s,
        "align_s": merger.alignment.get("align_s"),
    }
    return report


def _endpoint_metrics(endpoint: dict, checkpoint: str, splits: dict) -> dict | None:
    """An endpoint's {split: {metric: value}} at a checkpoint, if the report evaluated it."""
    source = endpoint if checkpoint == "final" else endpoint.get(checkpoint)
    if not isinstance(source, dict) or not all(s in source for s in splits):
        return None
    return {s: source[s] for s in splits}


def _curve(template, states: list, lambdas: list[float], splits: dict, batch_size: int, ends: list) -> dict:
    """{split: {metric: [value per lambda]}} along (1 - lam) * states[0] + lam * states[1].

    The points lam = 0 and 1 are the endpoints, already evaluated for the report: theta_0 itself, and
    theta_1 or pi(theta_1), which computes the same function (checked invariant), so they are reused
    and only the interior lambdas are evaluated (8 of the 44 networks of a pair's four curves).
    """
    interior = [lam for lam in lambdas if 0.0 < lam < 1.0]
    reuse = all(e is not None for e in ends) and len(interior) == len(lambdas) - 2
    lam = torch.tensor(interior if reuse else lambdas, dtype=torch.float64)
    res = evaluate_combinations(template, states, torch.stack([1 - lam, lam], 1), splits, batch_size=batch_size)
    if not reuse:
        return res
    return {
        s: {k: [ends[0][s][k], *values, ends[1][s][k]] for k, values in metrics.items() if k in ends[0][s]}
        for s, metrics in res.items()
    }


def repair_report(merger, splits: dict, repair: str, endpoints: list) -> dict:
    """The trained midpoints (vanilla, permuted) after REPAIR or a BatchNorm reset, and their barrier at the
    midpoint: mean of the two endpoints minus the midpoint (accuracy; loss the other way round)."""
    saved = merger._last_merge, merger._last_model  # the report's merges must not change what save_pretrained saves
    out: dict = {"midpoint": {}, "barrier_midpoint": {}}
    try:
        for mode in MODES:
            model = merger.merge(0.5, permute=(mode == "permuted"), repair=repair)
            res = {s: evaluate_model(model, split) for s, split in splits.items()}
            out["midpoint"][mode] = {s: {"loss": r["loss"], "acc": r["acc"]} for s, r in res.items()}
            out["barrier_midpoint"][mode] = {
                s: {
                    "acc": (endpoints[0][s]["acc"] + endpoints[1][s]["acc"]) / 2 - r["acc"],
                    "loss": r["loss"] - (endpoints[0][s]["loss"] + endpoints[1][s]["loss"]) / 2,
                }
                for s, r in res.items()
            }
    finally:
        merger._last_merge, merger._last_model = saved
    return out


def n_way(merger, test, batch_size: int, checkpoints=CHECKPOINTS) -> dict:
    """Test accuracy of the uniform average of the first k nets, k = 2..N (Fig. 3 mid), in one batched pass."""
    n = merger.num_nets
    coeffs = torch.zeros(n - 1, n, dtype=torch.float64)
    for row, k in enumerate(range(2, n + 1)):
        coeffs[row, :k] = 1.0 / k
    out: dict = {str(k): {} for k in range(2, n + 1)}
    for ck in checkpoints:
        for mode in MODES:
            states = [merger.permuted_state(i, ck, permute=(mode == "permuted")) for i in range(n)]
            res = evaluate_combinations(merger.load(0), states, coeffs, {"test": test}, batch_size=batch_size)["test"]
            for row, k in enumerate(range(2, n + 1)):
                out[str(k)].setdefault(ck, {})[mode] = {"test": {"acc": res["acc"][row], "loss": res["loss"][row]}}
    return out


def plane_report(merger, splits: dict, ev, checkpoints=CHECKPOINTS) -> dict:
    """Accuracy/loss on the plane through theta_0, theta_1 and pi(theta_1), trained and init, on every split
    the report evaluates: test (Fig. 1) and the training subset (Fig. 5's train loss)."""
    out = {}
    for ck in checkpoints:
        out[ck] = evaluate_plane(
            merger.load(0),
            merger.permuted_state(0, ck),
            merger.permuted_state(1, ck, permute=False),
            merger.permuted_state(1, ck),
            splits,
            resolution=ev.plane_resolution,
            batch_size=ev.batch_size,
        )
    return out


def schedules(merger, test, ev) -> dict:
    """Midpoint test accuracy at every saved checkpoint t, with perm@x (found at step x) and current perm (Fig. 3 right)."""
    first = merger.sources[1]
    names = [n for n in merger.sources[0].checkpoints if n in first.checkpoints]
    saved_steps = [checkpoint_step(n, 0) for n in names if n.startswith("step-")]
    total = (merger.pair or {}).get("steps", {}).get("total", max(saved_steps, default=0) + 1)
    names = sorted(names, key=lambda n: checkpoint_step(n, total))
    steps = [checkpoint_step(n, total) for n in names]
    saved_perms, saved_alignment = merger.permutations, merger.alignment
    settings = dict(saved_alignment.get("settings") or {})
    matcher = saved_alignment.get("matcher", "activation")

    def midpoints(perms) -> list[float]:
        merger.set_permutations(perms, **saved_alignment)
        coeffs = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
        accs = []
        for n in names:
            states = [merger.permuted_state(0, n), merger.permuted_state(1, n)]
            accs.append(
                evaluate_combinations(merger.load(0, n), states, coeffs, {"test": test}, batch_size=ev.batch_size)[
                    "test"
                ]["acc"][0]
            )
        return accs

    out = {"steps": steps, "checkpoints": names, "perm_at": {}}
    try:
        for x in ev.schedules:
            name = "init" if x == 0 else "final" if x == total else f"step-{x}"
            if name not in names:
                logger.warning("perm@%d skipped: no checkpoint %s (saved: %s)", x, name, names)
                continue
            perms = merger.align(matcher=matcher, checkpoint=name, **settings)
            out["perm_at"][str(x)] = midpoints(perms)
        merger.set_permutations(saved_perms, **saved_alignment)
        out["vanilla"] = midpoints([merger.permutations[0]] * merger.num_nets)
        if ev.current_perm:
            current = []
            for n in names:
                perms = merger.align(matcher=matcher, checkpoint=n, **settings)
                current.append(midpoints(perms)[names.index(n)])
            out["current_perm"] = current
    finally:
        merger.set_permutations(saved_perms, **saved_alignment)
    return out


def summary_table(report: dict) -> str:
    """The printed summary: single net, vanilla average, permuted average, barriers; trained and init.

    Row labels are left-aligned, numbers right-aligned under their column titles (each column as wide as
    its widest entry)."""
    rows = [["", "single net", "vanilla avg", "perm avg", "barrier van", "barrier perm"]]
    for ck in CHECKPOINTS:
        if ck not in report.get("midpoint", {}):
            continue
        singles = [e["test"] if ck == "final" else e["init"]["test"] for e in report["endpoints"][:2]]
        mid, bar = report["midpoint"][ck], report["barrier"][ck]
        for metric in ("acc", "loss"):
            values = [
                sum(s[metric] for s in singles) / len(singles),
                mid["vanilla"]["test"][metric],
                mid["permuted"]["test"][metric],
                bar["vanilla"]["test"][metric],
                bar["permuted"]["test"][metric],
            ]
            rows.append([f"{ck} {metric}"] + [f"{v:.4f}" for v in values])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]) for row in rows
    )
