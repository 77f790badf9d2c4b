"""What a reader sees: every plot's axes are labelled, no text runs past its axes, the summary table lines up."""

from __future__ import annotations

import re

import pytest

from hf_permerge.reporting import plots
from hf_permerge.reporting.report import summary_table


def metrics(acc: float, loss: float) -> dict:
    return {"acc": acc, "loss": loss}


def synthetic_report() -> dict:
    """A report with every plotted section; the plane's points sit on the grid's edges (labels must turn in)."""
    lams = [0.0, 0.5, 1.0]
    curve = {
        "lambdas": lams,
        "test": {"acc": [0.8, 0.6, 0.8], "loss": [0.5, 1.2, 0.5]},
        "train": {"acc": [0.85, 0.65, 0.85], "loss": [0.4, 1.1, 0.4]},
    }
    endpoint = {"test": metrics(0.8512, 0.5), "init": {"test": metrics(0.1, 2.3)}}
    u, v = [-10.0, 20.0, 50.0, 80.0, 110.0], [-10.0, 15.0, 40.0, 65.0, 90.0]
    plane = {
        "u": u,
        "v": v,
        "points": {"theta_0": [-10.0, 0.0], "theta_1": [110.0, 0.0], "pi_theta_1": [50.0, 90.0]},
        "test": {"acc": [[0.1 * (i + j) / 8 + 0.5 for i in range(5)] for j in range(5)]},
        "train": {"loss": [[0.1 * (i - j) + 1.0 for i in range(5)] for j in range(5)]},
    }
    both = {"vanilla": metrics(0.6, 1.2), "permuted": metrics(0.8, 0.55)}
    return {
        "endpoints": [endpoint, endpoint, endpoint],
        "curves": {ck: {"vanilla": curve, "permuted": curve} for ck in ("final", "init")},
        "midpoint": {ck: {mode: {"test": m} for mode, m in both.items()} for ck in ("final", "init")},
        "barrier": {ck: {mode: {"test": metrics(0.2, 123.4567)} for mode in both} for ck in ("final", "init")},
        "n_way": {
            k: {ck: {mode: {"test": {"acc": 0.5}} for mode in both} for ck in ("final", "init")} for k in ("2", "3")
        },
        "schedules": {
            "steps": [0, 10, 20],
            "perm_at": {"0": [0.5, 0.6, 0.7], "10": [0.6, 0.7, 0.8]},
            "current_perm": [0.5, 0.7, 0.8],
            "vanilla": [0.3, 0.4, 0.5],
        },
        "plane": {"final": plane, "init": plane},
    }


@pytest.fixture
def drawn_figures(monkeypatch):
    """Keep each figure a plot function makes, laid out and drawn as it would be saved."""
    figures = []

    def keep(fig, path):
        fig.tight_layout()
        fig.canvas.draw()
        figures.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield figures
    for fig in figures:
        plots.plt.close(fig)


@pytest.mark.parametrize("plot", [plots.plot_curves, plots.plot_n_way, plots.plot_schedules, plots.plot_plane])
def test_every_plot_labels_its_axes_and_keeps_its_text_inside(plot, drawn_figures, tmp_path):
    plot(synthetic_report(), tmp_path / "plot.png")
    (fig,) = drawn_figures
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        assert ax.get_xlabel() and ax.get_ylabel()
        box = ax.get_window_extent(renderer)
        for text in ax.texts:
            t = text.get_window_extent(renderer)
            assert box.x0 <= t.x0 and t.x1 <= box.x1 and box.y0 <= t.y0 and t.y1 <= box.y1, text.get_text()


def test_plane_heat_map_cells_are_centred_on_the_grid_points(drawn_figures, tmp_path):
    report = synthetic_report()
    plots.plot_plane(report, tmp_path / "plane.png")
    ax = drawn_figures[0].axes[0]
    u, v = report["plane"]["final"]["u"], report["plane"]["final"]["v"]
    half_u, half_v = (u[1] - u[0]) / 2, (v[1] - v[0]) / 2
    assert ax.get_xlim() == pytest.approx((u[0] - half_u, u[-1] + half_u))
    assert ax.get_ylim() == pytest.approx((v[0] - half_v, v[-1] + half_v))


def test_summary_table_columns_line_up_with_the_header():
    lines = summary_table(synthetic_report()).splitlines()
    header, rows = lines[0], lines[1:]
    assert [r.split()[:2] for r in rows] == [["final", "acc"], ["final", "loss"], ["init", "acc"], ["init", "loss"]]
    title_ends = [m.end() for m in re.finditer(r"\S+(?: \S+)*", header)]  # titles are words joined by one space
    assert len(title_ends) == 5
    for row in rows:
        assert [m.end() for m in re.finditer(r"-?\d+\.\d+", row)] == title_ends, "\n".join(lines)
    assert "123.4567" in lines[2]  # a wide number widens its column instead of pushing the row right


def test_plane_plot_adds_the_training_loss_map_when_the_report_has_it(drawn_figures, tmp_path):
    report = synthetic_report()
    plots.plot_plane(report, tmp_path / "plane.png")
    titles = [ax.get_title() for ax in drawn_figures[0].axes if ax.get_label() != "<colorbar>"]
    assert len(titles) == 4 and sum("training loss" in t for t in titles) == 2
    for ck in ("final", "init"):
        report["plane"][ck].pop("train", None)
    plots.plot_plane(report, tmp_path / "plane_test_only.png")
    assert len([ax for ax in drawn_figures[1].axes if ax.get_label() != "<colorbar>"]) == 2
