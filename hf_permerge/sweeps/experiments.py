"""What a cell measures, per experiment: the report pipeline's numbers, cut down to a small result.

Every experiment aligns the cell's pair and runs `build_report` (the one place curves, barriers,
n-way averages and schedules are computed); it only chooses which parts of the report to ask for
and which numbers to keep. All numbers are on the test split unless a key says `train`.

- `pair` (Fig. 2, 3 left, 4, 10, 11): single net, vanilla and permuted average, barriers; trained and init.
- `n_way` (Fig. 3 mid): the pair numbers plus the average of the first k nets, k = 2..N.
- `schedules` (Fig. 3 right, 4 right): the pair numbers plus the midpoint accuracy at every saved
  step under perm@x (permutation found at step x) and the current permutation.
- every experiment but `matchers` also keeps `random_acc` / `init_random_acc`: the midpoint of net 0 and net 1
  after a uniformly random permutation of net 1 (seeded by the cell's seed), the baseline that shows what
  matching buys over any permutation.
- `matchers` (App. B): for each labelled alignment (e.g. activation matching after training, the
  gradient/FOOF matcher at init, heads moved or kept), the pair numbers under that alignment, keyed
  `<label>:<metric>`, and the random-permutation baseline unlabelled.
- with `evaluation.repair`, the pair numbers also hold each correction's midpoint and the share of the permuted
  midpoint's barrier it removes (`repair_metrics`).
- `train`: no alignment; the nets' own test numbers from pair.json (text: the held-out books), `single_loss`,
  `single_acc`, and their curve over training, `single_loss_t{step}` (each mean over the nets).
"""

from __future__ import annotations

from pathlib import Path
from statistics import fmean

from ..config import AlignmentSection, RunConfig
from ..merging import PermMerger
from ..reporting.pipeline import align_merger, evaluation_splits
from ..reporting.report import build_report

CHECKPOINT_PREFIX = {"final": "", "init": "init_"}
MODE_SHORT = {"vanilla": "vanilla", "permuted": "perm"}


def pair_metrics(report: dict) -> dict[str, float]:
    """Flat numbers of a report: `single_acc`, `vanilla_acc`, `perm_acc`, `barrier_perm_loss`, ... and
    the same at initialisation with the prefix `init_` (the permutation is the one found by the alignment).
    `single_*` is the mean over all N nets (the better estimate of one net's number when N > 2; for a pair,
    its two endpoints, as in the printed summary)."""
    out: dict[str, float] = {}
    ends = report["endpoints"]
    for ck, prefix in CHECKPOINT_PREFIX.items():
        tests = [e["test"] if ck == "final" else e["init"]["test"] for e in ends]
        out[f"{prefix}single_acc"] = fmean(t["acc"] for t in tests)
        out[f"{prefix}single_loss"] = fmean(t["loss"] for t in tests)
        for mode, short in MODE_SHORT.items():
            mid = report["midpoint"][ck][mode]["test"]
            out[f"{prefix}{short}_acc"] = mid["acc"]
            out[f"{prefix}{short}_loss"] = mid["loss"]
            bars = report["barrier"][ck][mode]
            out[f"{prefix}barrier_{short}_acc"] = bars["test"]["acc"]
            out[f"{prefix}barrier_{short}_loss"] = bars["test"]["loss"]
            if "train" in bars:
                out[f"{prefix}barrier_{short}_train_loss"] = bars["train"]["loss"]
    return out | repair_metrics(report)


def repair_metrics(report: dict) -> dict[str, float]:
    """Per repair mode of the report (`repair`, `reset_bn`): `{mode}_{perm|vanilla}_acc` / `_loss`, the trained
    midpoint after the correction; `{mode}_barrier_perm_acc` / `_loss`, its barrier at the midpoint (endpoints'
    mean minus it); and `{mode}_removed_barrier_acc` / `_loss`, the share of the permuted midpoint's own barrier that the
    correction removes (REPAIR's measure: 1 - repaired barrier / unrepaired barrier)."""
    out: dict[str, float] = {}
    ends = report["endpoints"][:2]
    for mode, rep in (report.get("repair") or {}).items():
        for path, short in MODE_SHORT.items():
            mid = rep["midpoint"][path]["test"]
            out[f"{mode}_{short}_acc"], out[f"{mode}_{short}_loss"] = mid["acc"], mid["loss"]
        for metric, sign in (("acc", 1.0), ("loss", -1.0)):
            plain = sign * (
                fmean(e["test"][metric] for e in ends) - report["midpoint"]["final"]["permuted"]["test"][metric]
            )
            repaired = rep["barrier_midpoint"]["permuted"]["test"][metric]
            out[f"{mode}_barrier_perm_{metric}"] = repaired
            if plain > 0:  # else there is no barrier to remove: the share is left out of this cell
                out[f"{mode}_removed_barrier_{metric}"] = 1.0 - repaired / plain
    return out


def curves_of(report: dict) -> dict:
    """Test accuracy and loss along the interpolation, trained and init, vanilla and permuted."""
    return {
        ck: {
            mode: {"lambdas": c["lambdas"], "acc": c["test"]["acc"], "loss": c["test"]["loss"]}
            for mode, c in modes.items()
        }
        for ck, modes in report["curves"].items()
    }


def n_way_metrics(report: dict) -> dict[str, float]:
    """`nway{k}_{init_}{perm|vanilla}_acc` for k = 2..N."""
    out = {}
    for k, by_ck in report.get("n_way", {}).items():
        for ck, prefix in CHECKPOINT_PREFIX.items():
            for mode, short in MODE_SHORT.items():
                out[f"nway{k}_{prefix}{short}_acc"] = by_ck[ck][mode]["test"]["acc"]
    return out


def schedule_metrics(report: dict) -> dict[str, float]:
    """`sched_{perm@x|current|vanilla}_t{step}`: midpoint test accuracy at each saved step."""
    sch = report.get("schedules")
    if not sch:
        return {}
    out = {}
    series = {f"perm@{x}": accs for x, accs in sch["perm_at"].items()}
    series["vanilla"] = sch["vanilla"]
    if "current_perm" in sch:
        series["current"] = sch["current_perm"]
    for name, accs in series.items():
        for step, acc in zip(sch["steps"], accs):
            out[f"sched_{name}_t{step}"] = acc
    return out


def random_permutation_metrics(merger, split, seed: int) -> dict[str, float]:
    """`random_acc`, `init_random_acc` (and `_loss`): the midpoint of net 0 and net 1 permuted by a uniformly random
    permutation, trained and at init, on `split`."""
    import copy

    from ..alignment import Permutations
    from ..evaluation.interpolation import evaluate_model, interpolate_state_dicts

    shuffle = Permutations.random(merger.spec, seed=seed)
    out = {}
    for ck, prefix in CHECKPOINT_PREFIX.items():
        a, b = merger.load(0, ck), merger.load(1, ck)
        mid = copy.deepcopy(a)
        mid.load_state_dict(interpolate_state_dicts(a.state_dict(), shuffle.apply(b).state_dict(), 0.5))
        result = evaluate_model(mid, split)
        out[f"{prefix}random_acc"], out[f"{prefix}random_loss"] = result["acc"], result["loss"]
    return out


def train_metrics(pair_dir) -> dict[str, float]:
    """The `train` experiment's numbers: the nets' final test loss and accuracy, and the test loss at every
    evaluation during training (`log_history`), each the mean over the nets."""
    from ..records import PairRecord, read_record

    nets = read_record(Path(pair_dir) / "pair.json", PairRecord)["nets"]
    out = {"single_loss": fmean(n["test"]["loss"] for n in nets), "single_acc": fmean(n["test"]["acc"] for n in nets)}
    steps = sorted({h["step"] for n in nets for h in n.get("log_history", [])})
    for step in steps:
        losses = [h["test_loss"] for n in nets for h in n.get("log_history", []) if h["step"] == step]
        out[f"single_loss_t{step}"] = fmean(losses)
    return out


def _evaluation(config: RunConfig, n_way: bool = False, schedules: bool = False):
    """The cell's evaluation settings with only the parts this experiment reads switched on."""
    ev = config.evaluation
    return ev.model_copy(
        update={
            "n_way": n_way,
            "plane": False,
            "plots": False,
            "schedules": list(ev.schedules) if schedules else [],
            "current_perm": ev.current_perm if schedules else False,
        }
    )


def measure(
    experiment: str,
    config: RunConfig,
    pair_dir,
    device,
    matchers: dict | None = None,
    curves: bool = False,
    progress: bool = False,
) -> dict:
    """The cell result (without its bookkeeping): {"metrics": {...}, optional "curves", "timings"}."""
    if experiment == "train":
        return {"metrics": train_metrics(pair_dir), "timings": {}}
    merger = PermMerger.from_pretrained(pair_dir, device=device)
    splits = evaluation_splits(config, device, merger.recorded_normalisation())
    if experiment == "matchers":
        metrics, timings = {}, {}
        if "test" in splits:
            metrics |= random_permutation_metrics(merger, splits["test"], config.training.seed)
        for label, settings in (matchers or {}).items():
            alignment = AlignmentSection.model_validate({**config.alignment.model_dump(), **settings})
            cfg = config.model_copy(update={"alignment": alignment})
            align_merger(merger, cfg)
            report = build_report(merger, _evaluation(cfg), splits, progress=progress)
            metrics.update({f"{label}:{k}": v for k, v in pair_metrics(report).items()})
            timings[f"{label}:align_s"] = report["timings"]["align_s"]
            timings[f"{label}:evaluate_s"] = report["timings"]["evaluate_s"]
        return {"metrics": metrics, "timings": timings}
    align_merger(merger, config)
    report = build_report(
        merger,
        _evaluation(config, n_way=experiment == "n_way", schedules=experiment == "schedules"),
        splits,
        progress=progress,
    )
    metrics = pair_metrics(report) | n_way_metrics(report) | schedule_metrics(report)
    if "test" in splits:
        metrics |= random_permutation_metrics(merger, splits["test"], config.training.seed)
    out = {
        "metrics": metrics,
        "timings": {"align_s": report["timings"]["align_s"], "evaluate_s": report["timings"]["evaluate_s"]},
    }
    if curves:
        out["curves"] = curves_of(report)
    return out
