"""Sweeps: every smoke config runs, finished cells are skipped, errors come early, processes share the cells."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_permerge.config import ConfigError
from hf_permerge.sweeps import load_sweep_config, run_sweep, sweep_config_from_dict

ROOT = Path(__file__).parents[1]
SWEEPS = ROOT / "configs" / "sweeps"
SMOKE = sorted(p.name for p in SWEEPS.glob("*_smoke.yaml"))
EXE = str(Path(sys.executable).parent / "hf-permerge")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets on 2 shared cores run several times faster on one thread (no intra-op hand-offs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smoke(name, tiny_fmnist, *overrides):
    return load_sweep_config(SWEEPS / name, [f"data.data_dir={tiny_fmnist}", *overrides])


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_fashion_mnist_figure_has_a_smoke_config():
    full = {p.stem for p in SWEEPS.glob("*.yaml") if not p.stem.endswith("_smoke")}
    fmnist = {
        name
        for name in full
        if load_sweep_config(SWEEPS / f"{name}.yaml").cells[0].config.data.dataset == "fashion_mnist"
    }
    assert fmnist == {p.removesuffix("_smoke.yaml") for p in SMOKE}
    assert {
        "fig2_fmnist",
        "fig2_mnist",
        "fig2_cifar10",
        "fig3_left",
        "fig3_mid",
        "fig3_right",
        "fig4_right",
        "fig4_cnn_lr",
        "fig4_cnn_small",
        "fig11_init_loss",
        "appB_matchers",
    } <= full


def test_full_configs_match_the_paper_settings():
    fig2 = load_sweep_config(SWEEPS / "fig2_fmnist.yaml")
    assert len(fig2.cells) == 9 * 3 * 6
    tc = fig2.cells[0].config.training
    assert (tc.epochs, tc.batch_size, tc.optimizer, tc.lr, tc.weight_decay) == (5, 100, "adamw", 1e-3, 1e-2)
    assert fig2.sweep.grid["model.width"][0] == 32 and fig2.sweep.grid["model.width"][-1] == 8192
    mid = load_sweep_config(SWEEPS / "fig3_mid.yaml")
    assert all(
        c.config.model.depth == 1 and c.config.training.epochs == 1 and c.config.training.num_nets == 8
        for c in mid.cells
    )
    cnn = load_sweep_config(SWEEPS / "fig4_cnn_lr.yaml")
    assert {c.config.model.layers for c in cnn.cells} == {"128-128-avg-256-256"}
    assert {(c.config.training.optimizer, c.config.training.lr) for c in cnn.cells} >= {("sgd", 0.01), ("sgd", 0.1)}


@pytest.mark.parametrize("name", SMOKE)
def test_smoke_config_runs_and_writes_table_and_figure(name, tmp_path, tiny_fmnist):
    config = smoke(name, tiny_fmnist)
    result = run_sweep(config, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert not result.failed and len(result.ran) == len(config.cells)
    assert (out / f"{config.sweep.name}.png").stat().st_size > 10_000
    rows = read_csv(out / "results.csv")
    assert [r["cell"] for r in rows] == [c.id for c in config.cells] and {r["status"] for r in rows} == {"done"}
    summary = json.loads((out / "results.json").read_text())["summary"]
    for cell in config.cells:
        folder = out / "cells" / cell.id
        assert not (folder / "pair").exists()  # keep_pairs is off by default
        assert (folder / "result.json").stat().st_size < 20_000
    accs = [float(v) for r in rows for k, v in r.items() if k.endswith("acc") and "barrier" not in k]
    assert accs and all(0.0 <= a <= 1.0 for a in accs)
    experiment = config.sweep.experiment
    if experiment == "n_way":
        assert {f"nway{k}_init_perm_acc" for k in (2, 3, 4)} <= rows[0].keys()
        assert all(float(r["nway2_init_perm_acc"]) == float(r["init_perm_acc"]) for r in rows)  # k = 2 is the pair
    if experiment == "schedules":
        assert {"sched_perm@0_t0", "sched_perm@5_t20", "sched_current_t10", "sched_vanilla_t20"} <= rows[0].keys()
    if experiment == "matchers":
        assert {f"{label}:init_perm_acc" for label in config.sweep.matchers} <= rows[0].keys()
    if config.sweep.curves:
        assert (out / f"{config.sweep.name}_curves.png").exists()
        assert len(summary[0]["curves"]["init"]["permuted"]["acc"]) == config.cells[0].config.evaluation.num_lambdas


def test_permuted_average_beats_vanilla_average_in_the_smoke_sweep(tmp_path, tiny_fmnist):
    """The paper's Fig. 2 claim, at the smoke scale: 20 steps, 1000 images, width 32, two seeds."""
    config = smoke("fig2_fmnist_smoke.yaml", tiny_fmnist, "sweep.grid.model.width=[32]")
    run_sweep(config, tmp_path / "out", progress=False)
    for row in json.loads((tmp_path / "out" / "results.json").read_text())["summary"]:
        assert row["n"] == 2
        assert row["perm_acc"] > row["vanilla_acc"] + 0.1
        assert row["barrier_perm_loss"] < row["barrier_vanilla_loss"]


def test_seeds_trained_as_one_stack_give_the_same_results_as_one_pair_at_a_time(tmp_path, tiny_fmnist):
    """stack_seeds (default): a cell's seeds train together, and are measured at once on threads
    (measure_workers), with the same numbers as one pair at a time."""
    args = ("sweep.grid.model.width=[32]", "sweep.grid.training.seed=[0,1,2]")
    stacked = run_sweep(
        smoke("fig2_fmnist_smoke.yaml", tiny_fmnist, *args, "sweep.measure_workers=3"),
        tmp_path / "stacked",
        progress=False,
    )
    alone = run_sweep(
        smoke("fig2_fmnist_smoke.yaml", tiny_fmnist, *args, "sweep.stack_seeds=false"),
        tmp_path / "alone",
        progress=False,
    )
    assert sorted(stacked.ran) == sorted(alone.ran) and len(stacked.ran) == 6  # depths 1, 2 x three seeds
    for cell in stacked.ran:
        a, b = (
            json.loads((tmp_path / run / "cells" / cell / "result.json").read_text()) for run in ("stacked", "alone")
        )
        assert a["timings"]["trained_together"] == 3 and "trained_together" not in b["timings"]
        assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-4, abs=1e-5)


def test_second_run_skips_every_cell_and_writes_the_same_table(tmp_path, tiny_fmnist):
    config = smoke("fig3_mid_smoke.yaml", tiny_fmnist)
    first = run_sweep(config, tmp_path / "out", progress=False)
    tables = {n: (tmp_path / "out" / n).read_bytes() for n in ("results.csv", "summary.csv")}
    again = run_sweep(smoke("fig3_mid_smoke.yaml", tiny_fmnist), tmp_path / "out", progress=False)
    assert again.ran == [] and again.skipped == first.ran == [c.id for c in config.cells]
    assert {n: (tmp_path / "out" / n).read_bytes() for n in tables} == tables
    # a lost result is measured again, with the same numbers (each cell depends only on its seeds)
    lost = tmp_path / "out" / "cells" / config.cells[1].id / "result.json"
    before = json.loads(lost.read_text())["metrics"]
    lost.unlink()
    third = run_sweep(config, tmp_path / "out", progress=False)
    assert third.ran == [config.cells[1].id]
    assert json.loads(lost.read_text())["metrics"] == pytest.approx(before, rel=1e-5)


def test_extending_the_grid_reuses_the_cells_already_measured(tmp_path, tiny_fmnist):
    run_sweep(smoke("fig3_mid_smoke.yaml", tiny_fmnist, "sweep.grid.model.width=[8]"), tmp_path / "out", progress=False)
    more = run_sweep(smoke("fig3_mid_smoke.yaml", tiny_fmnist), tmp_path / "out", progress=False)
    assert more.skipped == ["width=8_seed=0"] and more.ran == ["width=32_seed=0"]
    assert len(read_csv(tmp_path / "out" / "results.csv")) == 2


def test_a_renamed_sweep_replaces_its_figure_and_keeps_other_files(tmp_path, tiny_fmnist):
    args = ("sweep.grid.model.width=[8]",)
    run_sweep(smoke("fig3_mid_smoke.yaml", tiny_fmnist, *args), tmp_path / "out", progress=False)
    old = smoke("fig3_mid_smoke.yaml", tiny_fmnist, *args).sweep.name
    (tmp_path / "out" / "notes.png").write_bytes(b"a user's file")
    again = run_sweep(
        smoke("fig3_mid_smoke.yaml", tiny_fmnist, *args, "sweep.name=renamed"), tmp_path / "out", progress=False
    )
    assert again.ran == [] and (tmp_path / "out" / "renamed.png").is_file()
    assert not (tmp_path / "out" / f"{old}.png").exists() and (tmp_path / "out" / "notes.png").is_file()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["figures"] == ["renamed.png"]


def test_cells_of_an_older_version_with_other_defaults_are_not_mixed_in(tmp_path, tiny_fmnist):
    """A format-1 cell's CNN with `bias: null` had biases (the default then): it does not count as today's."""
    config = smoke("fig4_cnn_small_smoke.yaml", tiny_fmnist, "sweep.grid.training.seed=[0]")
    first = run_sweep(config, tmp_path / "out", progress=False)
    result = tmp_path / "out" / "cells" / first.ran[0] / "result.json"
    data = json.loads(result.read_text())
    assert data["format"] == "hf_permerge.sweep_cell/2"
    data["format"] = "hf_permerge.sweep_cell/1"
    result.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"different config \(differs in model.bias\)"):
        run_sweep(config, tmp_path / "out", progress=False)


def test_a_changed_config_is_refused_before_any_work(tmp_path, tiny_fmnist):
    run_sweep(smoke("fig3_mid_smoke.yaml", tiny_fmnist, "sweep.grid.model.width=[8]"), tmp_path / "out", progress=False)
    changed = smoke("fig3_mid_smoke.yaml", tiny_fmnist, "sweep.grid.model.width=[8]", "training.lr=0.01")
    with pytest.raises(ConfigError, match=r"width=8_seed=0.*different config.*training\.lr"):
        run_sweep(changed, tmp_path / "out", progress=False)
    again = run_sweep(changed, tmp_path / "out", overwrite=True, progress=False)
    assert again.ran == ["width=8_seed=0"]


def test_keep_pairs_keeps_the_checkpoints(tmp_path, tiny_fmnist):
    config = smoke("fig3_left_smoke.yaml", tiny_fmnist, "sweep.keep_pairs=true", "sweep.grid.training.seed=[0]")
    run_sweep(config, tmp_path / "out", progress=False)
    pair = tmp_path / "out" / "cells" / "seed=0" / "pair"
    assert (pair / "pair.json").exists() and (pair / "net_1" / "init" / "model.safetensors").exists()


def test_a_failed_cell_is_recorded_and_retried(tmp_path, tiny_fmnist, monkeypatch):
    from hf_permerge.sweeps import experiments

    config = smoke("fig3_mid_smoke.yaml", tiny_fmnist)
    real = experiments.measure

    def flaky(experiment, cell_config, *args, **kwargs):
        if cell_config.model.width == 32:
            raise RuntimeError("disk full")
        return real(experiment, cell_config, *args, **kwargs)

    monkeypatch.setattr(experiments, "measure", flaky)
    result = run_sweep(config, tmp_path / "out", progress=False)
    assert result.failed == {"width=32_seed=0": "RuntimeError: disk full"}
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert [r["status"] for r in rows] == ["done", "failed"]
    assert (tmp_path / "out" / "cells" / "width=32_seed=0" / "pair" / "pair.json").exists()  # kept for the retry
    monkeypatch.setattr(experiments, "measure", real)
    retry = run_sweep(config, tmp_path / "out", progress=False)
    assert retry.ran == ["width=32_seed=0"] and not retry.failed
    assert not (tmp_path / "out" / "cells" / "width=32_seed=0" / "error.txt").exists()


BASE = {"model": {"type": "mlp", "width": 8}, "training": {"max_steps": 2}}


@pytest.mark.parametrize(
    "sweep, message",
    [
        (
            {"name": "s", "experiment": "pair", "grid": {"model.widht": [8]}},
            "unknown config key 'model.widht' \\(did you mean model.width\\?\\)",
        ),
        ({"name": "s", "experiment": "pair", "grid": {"modle.width": [8]}}, "'modle.width' is not a run-config key"),
        ({"name": "s", "experiment": "pair", "grid": {"model.width": []}}, "sweep.grid.model.width: give at least one"),
        ({"name": "s", "experiment": "pairs"}, "sweep.experiment: Input should be 'pair'"),
        ({"name": "s", "experiment": "pair", "gird": {}}, "sweep.gird: unknown key"),
        ({"experiment": "pair"}, "sweep.name: required"),
        ({"name": "a/b", "experiment": "pair"}, "sweep.name"),
        ({"name": "s", "experiment": "pair", "keep_pairs": "no"}, "sweep.keep_pairs"),
        ({"name": "s", "experiment": "pair", "measure_workers": 0}, "sweep.measure_workers: give a count >= 1"),
        ({"name": "s", "experiment": "matchers"}, "the `matchers` experiment needs at least one"),
        (
            {"name": "s", "experiment": "matchers", "matchers": {"g": {"matcher": "gradiant"}}},
            "sweep.matchers.g.matcher",
        ),
        ({"name": "s", "experiment": "pair", "x": "model.depth", "grid": {"model.width": [8]}}, "sweep.x"),
        (
            {"name": "s", "experiment": "pair", "grid": {"training.lr": [0.1]}, "cases": {"c": {"training.lr": 0.2}}},
            "set both in the grid and in a case",
        ),
        ({"name": "s", "experiment": "n_way"}, "training.num_nets >= 3"),
        (
            {"name": "s", "experiment": "pair", "grid": {"training.num_nets": [1]}},
            "needs at least 2; set training.num_nets",
        ),
        ({"name": "s", "experiment": "pair", "grid": {"training.epochs": [0]}}, "0 epochs would train nothing"),
        ({"name": "s", "experiment": "schedules"}, "needs evaluation.schedules"),
        (
            {"name": "s", "experiment": "pair", "grid": {"model.width": [8, 0]}},
            r"cell width=0\):\n  model.width: Input should be greater than or equal to 1",
        ),
    ],
)
def test_invalid_sweep_configs_fail_early_naming_the_key(sweep, message):
    with pytest.raises(ConfigError, match=message):
        sweep_config_from_dict({**BASE, "sweep": sweep}, "s.yaml")


def test_overrides_reach_grid_keys_and_case_names_with_dots():
    sweep = {
        "name": "s",
        "experiment": "pair",
        "grid": {"model.width": [8]},
        "cases": {"sgd lr 0.01": {"training.optimizer": "sgd", "training.lr": 0.01}},
    }
    config = sweep_config_from_dict(
        {**BASE, "sweep": sweep},
        "s.yaml",
        [
            "sweep.grid.model.width=[8,16]",
            "sweep.cases.sgd lr 0.01.training.lr=0.02",
            "sweep.keep_pairs=true",
            "training.max_steps=3",
        ],
    )
    assert [c.id for c in config.cells] == ["case=sgd-lr-0.01_width=8", "case=sgd-lr-0.01_width=16"]
    assert {(c.config.training.lr, c.config.training.max_steps) for c in config.cells} == {(0.02, 3)}
    assert config.sweep.keep_pairs and config.sweep.cases["sgd lr 0.01"]["training.optimizer"] == "sgd"


def test_unknown_section_and_missing_sweep_section():
    with pytest.raises(ConfigError, match="modle: unknown section"):
        sweep_config_from_dict({"modle": {}, "sweep": {"name": "s", "experiment": "pair"}})
    with pytest.raises(ConfigError, match="needs a `sweep:` section"):
        sweep_config_from_dict(BASE)


def test_cli_reports_config_errors_without_a_traceback_or_output(tmp_path):
    out = tmp_path / "out"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_permerge.cli",
            "sweep",
            str(SWEEPS / "fig2_fmnist_smoke.yaml"),
            "-o",
            str(out),
            "--set",
            "sweep.grid.model.widht=[8]",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown config key 'model.widht'" in bad.stderr and "Traceback" not in bad.stderr
    assert "[from --set sweep.grid.model.widht=[8]]" in bad.stderr
    assert not out.exists()


@pytest.mark.parametrize("name, dataset", [("fig2_mnist.yaml", "mnist"), ("fig2_cifar10.yaml", "cifar10")])
def test_data_that_is_not_available_fails_clearly_before_writing(name, dataset, tmp_path):
    config = load_sweep_config(
        SWEEPS / name, ["sweep.grid.model.width=[32]", "sweep.grid.model.depth=[1]", "sweep.grid.training.seed=[0]"]
    )
    with pytest.raises(RuntimeError, match=f"could not load '{dataset}'.*data.data_dir"):
        run_sweep(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_sweep_is_never_deleted(tmp_path, tiny_fmnist):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    config = smoke("fig3_left_smoke.yaml", tiny_fmnist)
    with pytest.raises(FileExistsError, match="does not hold a sweep of hf_permerge"):
        run_sweep(config, mine, progress=False)
    with pytest.raises(FileExistsError, match="refusing to delete"):
        run_sweep(config, mine, overwrite=True, progress=False)
    assert (mine / "notes.txt").read_text() == "precious"


def test_two_processes_share_the_cells_and_give_the_same_table(tmp_path, tiny_fmnist):
    """`accelerate launch` with 2 CPU processes (gloo): cell i on process i % 2; same numbers as one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    acc_cfg = tmp_path / "accelerate.yaml"
    acc_cfg.write_text(
        (ROOT / "examples" / "accelerate_cpu_2proc.yaml")
        .read_text()
        .replace("main_process_port: 29541", "main_process_port: 29519")
    )
    args = [str(SWEEPS / "fig3_left_smoke.yaml"), "--set", f"data.data_dir={tiny_fmnist}"]
    two = subprocess.run(
        [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--config_file",
            str(acc_cfg),
            str(ROOT / "examples" / "sweep.py"),
            "-q",
            *args,
            "-o",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[process 0] cell 1/1 seed=0: done" in two.stdout and "[process 1] cell 1/1 seed=1: done" in two.stdout
    one = subprocess.run(
        [EXE, "-q", "sweep", *args, "-o", str(tmp_path / "one")], env=env, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]
    for a, b in zip(read_csv(tmp_path / "one" / "results.csv"), read_csv(tmp_path / "two" / "results.csv")):
        assert a["cell"] == b["cell"]
        for key in a:
            if key.endswith("_acc"):
                assert a[key] == b[key], key
            elif key.endswith("_loss"):
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), key


def test_measure_workers_auto_is_one_on_the_cpu_and_counts_are_capped_by_the_stack(tiny_fmnist):
    from hf_permerge.sweeps.runner import measure_workers

    stack = smoke("fig2_fmnist_smoke.yaml", tiny_fmnist, "sweep.grid.training.seed=[0,1,2]").cells[:3]
    assert measure_workers("auto", stack, "cpu") == 1
    assert measure_workers(8, stack, "cpu") == 3 and measure_workers(2, stack, "cpu") == 2
