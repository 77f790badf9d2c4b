"""One figure per experiment, from the summary (mean ± Student-t 95% interval over seeds), in the paper's colours.

- pair (Fig. 2, 4, 10, 11): test accuracy and loss against the sweep's x key, one column per value of
  the other keys: single net (black), vanilla average (red), permuted average (blue); and the same
  at initialisation. With `sweep.curves` also `<name>_curves.png`: the interpolation curves (Fig. 3 left).
- n_way (Fig. 3 mid): accuracy of the average of k permuted inits against k, one line per x value.
- schedules (Fig. 3 right): midpoint accuracy over training under perm@x, current perm and vanilla.
- matchers (App. B): averaged-init (and trained) accuracy under each matcher.
- train: the nets' test loss (text: held-out) over training, one line per x value.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..reporting.plots import COLOURS  # noqa: E402
from .config import SweepConfig  # noqa: E402

CHANCE = 0.1  # all three data sets have 10 balanced classes
SERIES = (("single", "single net"), ("vanilla", "vanilla avg"), ("perm", "perm avg"))
SERIES_COLOURS = {"single": COLOURS["single"], "vanilla": COLOURS["vanilla"], "perm": COLOURS["permuted"]}


def _label(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _other_keys(config: SweepConfig, exclude: tuple = ()) -> list[str]:
    s = config.sweep
    keys = (["case"] if s.cases else []) + list(s.grid)
    return [k for k in keys if k != s.seed_key and k not in exclude]


def _order(config: SweepConfig, key: str) -> list:
    return list(config.sweep.cases) if key == "case" else list(config.sweep.grid.get(key, []))


def _panels(config: SweepConfig, summary: list[dict], keys: list[str]) -> list[tuple[str, list[dict]]]:
    """Summary rows grouped by the values of `keys`, in the sweep's order, with a title each."""
    groups: dict[tuple, list[dict]] = {}
    for row in summary:
        groups.setdefault(tuple(repr(row[k]) for k in keys), []).append(row)
    ordered = sorted(groups.values(), key=lambda rows: [_order(config, k).index(rows[0][k]) for k in keys])
    return [(", ".join(f"{_label(k)}={rows[0][k]}" for k in keys) or config.sweep.name, rows) for rows in ordered]


def _positions(values: list) -> tuple[list[float], bool]:
    """x positions: the values themselves when numeric, else 0..n-1 (categorical); and whether log2 scale."""
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        log = min(values) > 0 and max(values) / min(values) >= 4
        return [float(v) for v in values], log
    return [float(i) for i in range(len(values))], False


def _band(ax, xs, rows, metric, colour, label, categorical, **kw):
    pts = [(x, r[metric], r.get(f"{metric}_ci")) for x, r in zip(xs, rows) if r.get(metric) is not None]
    if not pts:
        return
    x, y, s = zip(*pts)
    err = [e if e is not None and math.isfinite(e) else 0.0 for e in s]
    if categorical or len(x) == 1:
        ax.errorbar(x, y, yerr=err, fmt="o", color=colour, label=label, capsize=3, ms=4, **kw)
    else:
        ax.plot(x, y, marker="o", ls=kw.pop("ls", "-"), color=colour, label=label, ms=3, **kw)
        ax.fill_between(
            x, [a - b for a, b in zip(y, err)], [a + b for a, b in zip(y, err)], color=colour, alpha=0.2, lw=0
        )


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _grid(n_rows: int, n_cols: int):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.6 * n_cols + 0.8, 2.9 * n_rows + 0.4), squeeze=False)
    return fig, axes


def plot_pair(config: SweepConfig, summary: list[dict], path: Path) -> str:
    x_key = config.sweep.x_key
    panels = _panels(config, summary, _other_keys(config, (x_key,)))
    rows_spec = [
        ("", "acc", "trained: test accuracy"),
        ("", "loss", "trained: test loss"),
        ("init_", "acc", "init (perm. from training): test acc."),
    ]
    fig, axes = _grid(len(rows_spec), len(panels))
    for col, (title, rows) in enumerate(panels):
        rows = sorted(rows, key=lambda r: _order(config, x_key).index(r[x_key])) if x_key else rows
        xs_raw = [r[x_key] for r in rows] if x_key else [config.sweep.name] * len(rows)
        xs, log = _positions(xs_raw)
        categorical = xs_raw and not isinstance(xs_raw[0], (int, float))
        for r, (prefix, metric, ylabel) in enumerate(rows_spec):
            ax = axes[r][col]
            for j, (short, name) in enumerate(SERIES):
                dodged = [x + (j - 1) * 0.08 for x in xs] if categorical else xs  # side by side, not on top
                _band(ax, dodged, rows, f"{prefix}{short}_{metric}", SERIES_COLOURS[short], name, categorical)
            if prefix == "init_" and metric == "acc":
                ax.axhline(CHANCE, color="grey", ls=":", lw=1, label="chance")
            if log:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(v) for v in xs_raw], rotation=20 if categorical else 0, fontsize=8)
            ax.minorticks_off()
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(title, fontsize=9)
            if r == len(rows_spec) - 1:
                ax.set_xlabel(_label(x_key) if x_key else "")
    axes[0][0].legend(fontsize=7)
    axes[-1][0].legend(fontsize=7)
    fig.suptitle(f"{config.sweep.name}: mean ± Student-t 95% interval over seeds", fontsize=10)
    return _save(fig, path)


def plot_curves(config: SweepConfig, summary: list[dict], path: Path) -> str:
    panels = _panels(config, summary, _other_keys(config))
    fig, axes = _grid(2, len(panels))
    for col, (title, rows) in enumerate(panels):
        curves = rows[0].get("curves")
        if not curves:
            continue
        for r, (ck, prefix) in enumerate((("final", ""), ("init", "init_"))):
            ax = axes[r][col]
            for mode, short in (("vanilla", "vanilla"), ("permuted", "perm")):
                c = curves[ck][mode]
                ax.plot(c["lambdas"], c["acc"], "-o", ms=3, color=SERIES_COLOURS[short], label=f"{short} interpolation")
            ax.axhline(rows[0][f"{prefix}single_acc"], color="black", lw=1, label="single net (mean)")
            if ck == "init":
                ax.axhline(CHANCE, color="grey", ls=":", lw=1, label="chance")
            ax.set_title(f"{title}\n{'trained' if ck == 'final' else 'init, perm. from training'}", fontsize=9)
            ax.set_xlabel("λ  ((1-λ)·θ₀ + λ·π(θ₁))", fontsize=8)
            ax.set_ylabel("test accuracy", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def plot_n_way(config: SweepConfig, summary: list[dict], path: Path) -> str:
    x_key = config.sweep.x_key
    panels = _panels(config, summary, _other_keys(config, (x_key,)))
    fig, axes = _grid(2, len(panels))
    cmap = plt.get_cmap("viridis")
    for col, (title, rows) in enumerate(panels):
        rows = sorted(rows, key=lambda r: _order(config, x_key).index(r[x_key])) if x_key else rows
        for r, prefix in enumerate(("init_", "")):
            ax = axes[r][col]
            for j, row in enumerate(rows):
                ks = sorted(
                    int(m[4:].split("_", 1)[0])
                    for m in row
                    if m.startswith("nway") and m.endswith(f"_{prefix}perm_acc")
                )
                colour = cmap(j / max(1, len(rows) - 1) * 0.9)
                label = f"{_label(x_key)}={row[x_key]}" if x_key else None
                fake = [{"v": row[f"{prefix}single_acc"], "v_ci": row.get(f"{prefix}single_acc_ci")}] + [
                    {"v": row[f"nway{k}_{prefix}perm_acc"], "v_ci": row.get(f"nway{k}_{prefix}perm_acc_ci")} for k in ks
                ]
                _band(ax, [1] + ks, fake, "v", colour, label, False)
                ax.plot(ks, [row[f"nway{k}_{prefix}vanilla_acc"] for k in ks], ":", color=colour, lw=1)
            if prefix == "init_":
                ax.axhline(CHANCE, color="grey", ls=":", lw=1)
            ax.set_title(
                f"{title}\n{'init avg (perm. from training)' if prefix else 'trained avg'}; dotted: vanilla", fontsize=9
            )
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel("number of averaged nets k (1: single net)", fontsize=8)
            ax.set_ylabel("test accuracy", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def plot_schedules(config: SweepConfig, summary: list[dict], path: Path) -> str:
    panels = _panels(config, summary, _other_keys(config))
    fig, axes = _grid(1, len(panels))
    cmap = plt.get_cmap("RdPu")
    for col, (title, rows) in enumerate(panels):
        row, ax = rows[0], axes[0][col]
        series: dict[str, dict[int, str]] = {}
        for m in row:
            if m.startswith("sched_") and not m.endswith("_ci"):
                name, step = m[len("sched_") :].rsplit("_t", 1)
                series.setdefault(name, {})[int(step)] = m
        perms = sorted((s for s in series if s.startswith("perm@")), key=lambda s: int(s[5:]))
        for j, name in enumerate(perms + [s for s in ("current", "vanilla") if s in series]):
            steps = sorted(series[name])
            colour = {"current": COLOURS["permuted"], "vanilla": COLOURS["vanilla"]}.get(
                name, cmap(0.4 + 0.6 * j / max(1, len(perms)))
            )
            pts = [{"v": row[series[name][t]], "v_ci": row.get(f"{series[name][t]}_ci")} for t in steps]
            _band(
                ax,
                steps,
                pts,
                "v",
                colour,
                "current perm" if name == "current" else name,
                False,
                ls="--" if name == "current" else "-",
            )
        ax.axhline(CHANCE, color="grey", ls=":", lw=1)
        positive = [t for s in series.values() for t in s if t > 0]
        ax.set_xscale("symlog", linthresh=max(1, min(positive, default=1)))
        ax.set_xlim(left=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step t (perm@x applied to the nets at step t)", fontsize=8)
        ax.set_ylabel("test accuracy of the midpoint", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_matchers(config: SweepConfig, summary: list[dict], path: Path) -> str:
    panels = _panels(config, summary, _other_keys(config))
    labels = list(config.sweep.matchers)
    fig, axes = _grid(2, len(panels))
    xs = list(range(len(labels)))
    for col, (title, rows) in enumerate(panels):
        row = rows[0]
        for r, prefix in enumerate(("init_", "")):
            ax = axes[r][col]
            for j, (short, name) in enumerate(SERIES):
                pts = [
                    {"v": row.get(f"{lab}:{prefix}{short}_acc"), "v_ci": row.get(f"{lab}:{prefix}{short}_acc_ci")}
                    for lab in labels
                ]
                _band(ax, [x + (j - 1) * 0.08 for x in xs], pts, "v", SERIES_COLOURS[short], name, True)
            if prefix == "init_":
                ax.axhline(CHANCE, color="grey", ls=":", lw=1, label="chance")
            ax.set_xticks(xs, labels, rotation=20, fontsize=8)
            ax.set_title(
                f"{title}\n{'initialisations' if prefix else 'trained nets'}: midpoint test accuracy", fontsize=9
            )
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def plot_train(config: SweepConfig, summary: list[dict], path: Path) -> str:
    x_key = config.sweep.x_key
    panels = _panels(config, summary, _other_keys(config, (x_key,)))
    fig, axes = _grid(1, len(panels))
    cmap = plt.get_cmap("viridis")
    for col, (title, rows) in enumerate(panels):
        rows = sorted(rows, key=lambda r: _order(config, x_key).index(r[x_key])) if x_key else rows
        ax = axes[0][col]
        for j, row in enumerate(rows):
            steps = sorted(int(m[len("single_loss_t") :]) for m in row if _is_curve_point(m))
            pts = [{"v": row[f"single_loss_t{t}"], "v_ci": row.get(f"single_loss_t{t}_ci")} for t in steps]
            label = f"{_label(x_key)}={row[x_key]}" if x_key else None
            _band(ax, steps, pts, "v", cmap(j / max(1, len(rows) - 1) * 0.9), label, False)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_ylabel("test loss (text: held-out books)", fontsize=8)
        ax.grid(alpha=0.3)
        if x_key:
            ax.legend(fontsize=7)
    fig.suptitle("mean over nets; band: Student-t 95% interval over seeds", fontsize=8)
    return _save(fig, path)


def _is_curve_point(metric: str) -> bool:
    return metric.startswith("single_loss_t") and not metric.endswith("_ci")


def write_figures(config: SweepConfig, summary: list[dict], output_dir: Path) -> list[str]:
    name, experiment = config.sweep.name, config.sweep.experiment
    out = Path(output_dir)
    plot = {
        "pair": plot_pair,
        "n_way": plot_n_way,
        "schedules": plot_schedules,
        "matchers": plot_matchers,
        "train": plot_train,
    }[experiment]
    written = [plot(config, summary, out / f"{name}.png")]
    if config.sweep.curves and any("curves" in r for r in summary):
        written.append(plot_curves(config, summary, out / f"{name}_curves.png"))
    return written
