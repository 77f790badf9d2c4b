"""PNG plots of a report, in the paper's colours: single net black, vanilla red, permuted blue."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import patheffects  # noqa: E402

COLOURS = {"vanilla": "tab:red", "permuted": "tab:blue", "single": "black"}
TITLES = {"final": "trained nets", "init": "initialisations (permutation from training)"}
POINT_LABELS = {"theta_0": "θ₀", "theta_1": "θ₁", "pi_theta_1": "π(θ₁)"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(report: dict, path: Path) -> Path:
    """Accuracy and loss along the interpolation, trained and init (paper Fig. 1/3 left)."""
    cks = [ck for ck in ("final", "init") if ck in report["curves"]]
    fig, axes = plt.subplots(len(cks), 2, figsize=(10, 3.6 * len(cks)), squeeze=False)
    for row, ck in enumerate(cks):
        for col, metric in enumerate(("acc", "loss")):
            ax = axes[row][col]
            for mode in ("vanilla", "permuted"):
                curve = report["curves"][ck][mode]
                lam = curve["lambdas"]
                ax.plot(lam, curve["test"][metric], "-o", ms=3, color=COLOURS[mode], label=f"{mode} (test)")
                if "train" in curve:
                    ax.plot(lam, curve["train"][metric], "--", color=COLOURS[mode], alpha=0.6, label=f"{mode} (train)")
            key = "test" if ck == "final" else None
            singles = [(e[key] if key else e["init"]["test"])[metric] for e in report["endpoints"][:2]]
            ax.axhline(sum(singles) / len(singles), color=COLOURS["single"], lw=1, label="single net (mean)")
            if metric == "acc" and ck == "init":
                ax.axhline(0.1, color="grey", ls=":", lw=1, label="chance")
            ax.set_xlabel("λ  ((1-λ)·θ₀ + λ·θ₁)")
            ax.set_ylabel("accuracy" if metric == "acc" else "loss")
            ax.set_title(f"{TITLES[ck]}: {'accuracy' if metric == 'acc' else 'loss'}")
            ax.grid(alpha=0.3)
            if (row, col) == (0, 0) or (metric == "acc" and ck == "init"):  # the init panel adds "chance"
                ax.legend(fontsize=7)
    return _save(fig, path)


def plot_n_way(report: dict, path: Path) -> Path:
    """Test accuracy of the average of k nets, vanilla vs permuted, trained and init (Fig. 3 mid)."""
    ks = sorted(report["n_way"], key=int)
    cks = [ck for ck in ("final", "init") if ck in report["n_way"][ks[0]]]
    fig, axes = plt.subplots(1, len(cks), figsize=(5 * len(cks), 3.6), squeeze=False)
    width = 0.38
    for ax, ck in zip(axes[0], cks):
        for j, mode in enumerate(("vanilla", "permuted")):
            vals = [report["n_way"][k][ck][mode]["test"]["acc"] for k in ks]
            ax.bar([i + (j - 0.5) * width for i in range(len(ks))], vals, width, color=COLOURS[mode], label=mode)
        ax.set_xticks(range(len(ks)), ks)
        ax.set_xlabel("number of averaged nets k")
        ax.set_ylabel("test accuracy")
        ax.set_title(TITLES[ck])
        if ck == "init":
            ax.axhline(0.1, color="grey", ls=":", lw=1, label="chance")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_schedules(report: dict, path: Path) -> Path:
    """Midpoint test accuracy over training with perm@x and current perm (Fig. 3 right)."""
    sch = report["schedules"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    cmap = plt.get_cmap("RdPu")
    n = max(1, len(sch["perm_at"]))
    for j, (x, accs) in enumerate(sorted(sch["perm_at"].items(), key=lambda kv: int(kv[0]))):
        ax.plot(sch["steps"], accs, "-o", ms=3, color=cmap(0.4 + 0.6 * j / n), label=f"perm@{x}")
    if "current_perm" in sch:
        ax.plot(sch["steps"], sch["current_perm"], "--", color=COLOURS["permuted"], label="current perm")
    ax.plot(sch["steps"], sch["vanilla"], "-", color=COLOURS["vanilla"], label="vanilla")
    ax.set_xscale("symlog", linthresh=max(1, min([s for s in sch["steps"] if s > 0], default=1)))
    ax.set_xlabel("training step t")
    ax.set_ylabel("test accuracy of the midpoint")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_plane(report: dict, path: Path) -> Path:
    """Heat maps on the plane through θ₀, θ₁, π(θ₁), trained and init: test accuracy (Fig. 1) and, when the
    report evaluated the training subset, training loss (Fig. 5)."""
    cks = [ck for ck in ("final", "init") if ck in report["plane"]]
    panels = [("test", "acc", "test accuracy", "viridis")]
    if all("train" in report["plane"][ck] for ck in cks):
        panels.append(("train", "loss", "training loss", "magma_r"))
    fig, axes = plt.subplots(len(panels), len(cks), figsize=(5.2 * len(cks), 4.4 * len(panels)), squeeze=False)
    for row, (split, metric, label, cmap) in enumerate(panels):
        for ax, ck in zip(axes[row], cks):
            plane = report["plane"][ck]
            u, v = plane["u"], plane["v"]
            # grid[j][i] is the value at (u[i], v[j]): each cell is centred on its grid point
            im = ax.pcolormesh(u, v, plane[split][metric], shading="nearest", cmap=cmap)
            fig.colorbar(im, ax=ax, label=label)
            for name, (pu, pv) in plane["points"].items():
                ax.plot(pu, pv, "w^" if "pi" in name else "wo", ms=7, mec="k")
                # the label points into the plot, so none runs past its edges
                right, top = pu > (u[0] + u[-1]) / 2, pv > (v[0] + v[-1]) / 2
                ax.annotate(
                    POINT_LABELS.get(name, name),
                    (pu, pv),
                    textcoords="offset points",
                    xytext=(-6 if right else 6, -6 if top else 6),
                    ha="right" if right else "left",
                    va="top" if top else "bottom",
                    color="w",
                    fontsize=10,
                    path_effects=[patheffects.withStroke(linewidth=2, foreground="black")],
                )
            ax.set_xlabel("u: distance along θ₁ − θ₀")
            ax.set_ylabel("v: distance towards π(θ₁), orthogonal to u")
            ax.set_title(f"{TITLES[ck]}: {label}")
    return _save(fig, path)


def write_plots(report: dict, out_dir: Path) -> list[str]:
    """All plots the report has data for; returns the file names written."""
    out_dir = Path(out_dir)
    written = [plot_curves(report, out_dir / "interpolation.png").name]
    if report.get("n_way"):
        written.append(plot_n_way(report, out_dir / "n_way.png").name)
    if report.get("schedules"):
        written.append(plot_schedules(report, out_dir / "schedules.png").name)
    if report.get("plane"):
        written.append(plot_plane(report, out_dir / "plane.png").name)
    return written
