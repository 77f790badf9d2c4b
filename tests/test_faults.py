"""Faults: a failed job loses nothing a user had and leaves nothing it made; one writer per output folder."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes' hash: 'exactly as it was' is equality of two snapshots."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def beside(folder: Path) -> list[str]:
    """What lies next to `folder` besides it: a job's staging folder or lock file must not be left there."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}"))


@pytest.fixture
def config_file(tmp_path, tiny_fmnist):
    def write(**training):
        path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
        path.write_text(yaml.safe_dump({
            "model": {"type": "mlp", "depth": 1, "width": 32},
            "data": {"dataset": "fashion_mnist", "data_dir": str(tiny_fmnist)},
            "training": {"num_nets": 2, "seed": 0, "epochs": 2, "save_steps": [5], **training},
            "alignment": {"num_examples": 500}, "evaluation": {"train_subset": 500, "num_lambdas": 3,
                                                               "n_way": False, "plots": False}}))
        return path
    return write


def fail_at_step(monkeypatch, step: int):
    """Make the training engine raise an allocation error at optimiser step `step` (1-based)."""
    from hf_permerge.training import trainer

    make = trainer.make_engine

    def failing(*args, **kwargs):
        engine, calls = make(*args, **kwargs), [0]
        original = engine.step

        def step_or_fail(*a):
            calls[0] += 1
            if calls[0] == step:
                raise MemoryError("cannot allocate 1.2 GiB")
            return original(*a)
        engine.step = step_or_fail
        return engine
    monkeypatch.setattr(trainer, "make_engine", failing)


def fake_run_folder(tiny_pair, folder: Path) -> Path:
    shutil.copytree(tiny_pair, folder / "pair")
    (folder / "report.json").write_text('{"made": "by the first run"}\n')
    return folder


# -- 0: --overwrite replaces on success only ------------------------------------------------------------------

def test_train_overwrite_that_fails_mid_run_keeps_the_old_pair(tiny_pair, tmp_path, config_file, monkeypatch,
                                                                 run_cli, capsys):
    pair = tmp_path / "c"
    shutil.copytree(tiny_pair, pair)
    before = snapshot(pair)
    fail_at_step(monkeypatch, 3)
    assert run_cli("train", config_file(), "-o", pair, "--overwrite", "-q") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot allocate" in err and f"{pair} is as it was" in err
    assert snapshot(pair) == before and beside(pair) == []


def test_run_overwrite_that_cannot_run_keeps_the_old_run(tiny_pair, tmp_path, config_file, run_cli, capsys):
    """The issue's case: `run CFG -o r` then `run CFG -o r --overwrite --set data.data_dir=/empty`."""
    run = fake_run_folder(tiny_pair, tmp_path / "r")
    before = snapshot(run)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("run", config_file(), "-o", run, "--overwrite", "--set", f"data.data_dir={empty}", "-q") == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert snapshot(run) == before and beside(run) == []


@pytest.mark.parametrize("command", ["align", "merge", "evaluate"])
def test_align_merge_evaluate_overwrite_that_fails_keeps_the_old_output(command, tiny_pair, tmp_path, monkeypatch,
                                                                        run_cli, capsys):
    from hf_permerge.merging import PermMerger

    out = tmp_path / command
    if command == "evaluate":
        fake_run_folder(tiny_pair, out)
        (out / "merged").mkdir()
        (out / "merged" / "merge_config.json").write_text("{}")
        pair = out / "pair"                          # evaluate a run's own pair again, into the run folder
    else:
        assert run_cli(command, tiny_pair, "-o", out, "-q", "--num-examples", 200) == 0
        pair = tiny_pair
    before = snapshot(out)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("cannot allocate 3.0 GiB")
    monkeypatch.setattr(PermMerger, "align", out_of_memory)
    assert run_cli(command, pair, "-o", out, "--overwrite", "-q") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot allocate" in err and "is as it was" in err
    assert snapshot(out) == before and beside(out) == []


def test_evaluate_overwrite_into_a_run_folder_replaces_its_outputs_and_keeps_its_pair(tiny_pair, tmp_path, run_cli):
    out = fake_run_folder(tiny_pair, tmp_path / "r")
    pair_before = snapshot(out / "pair")
    (out / "merged").mkdir()
    (out / "merged" / "merge_config.json").write_text("{}")
    assert run_cli("evaluate", out / "pair", "-o", out, "--overwrite", "-q", "--set", "evaluation.num_lambdas=3",
                   "--set", "evaluation.n_way=false", "--set", "alignment.num_examples=200",
                   "--set", "evaluation.plots=false") == 0
    assert snapshot(out / "pair") == pair_before
    assert json.loads((out / "report.json").read_text())["pair"] == str(out / "pair").lstrip("/").split("/")[-1] \
        or "made" not in json.loads((out / "report.json").read_text())
    assert (out / "merged" / "model.safetensors").is_file() and beside(out) == []


def test_sweep_overwrite_that_fails_keeps_the_old_sweep(tmp_path, monkeypatch, run_cli, capsys):
    import hf_permerge.sweeps as sweeps

    sweep = tmp_path / "s"
    (sweep / "cells" / "a").mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    (sweep / "cells" / "a" / "result.json").write_text("{}")
    before = snapshot(sweep)
    config = tmp_path / "sweep.yaml"
    shutil.copy(next(Path("configs/sweeps").glob("*.yaml")), config)

    def crash(config, output_dir, **kwargs):
        (Path(output_dir) / "sweep.json").write_text("{}")
        raise MemoryError("cannot allocate")
    monkeypatch.setattr(sweeps, "run_sweep", crash)
    assert run_cli("sweep", config, "-o", sweep, "--overwrite", "-q") == 2
    assert "is as it was" in capsys.readouterr().err
    assert snapshot(sweep) == before and beside(sweep) == []


# -- 3: a failed run leaves nothing it made ---------------------------------------------------------------------

def test_a_train_that_fails_before_any_resume_point_leaves_nothing(tmp_path, config_file, monkeypatch, run_cli,
                                                                   capsys):
    out = tmp_path / "c"
    fail_at_step(monkeypatch, 3)
    assert run_cli("train", config_file(), "-o", out, "-q") == 2
    err = capsys.readouterr().err
    assert "cannot allocate" in err and "nothing it made was left" in err
    assert not out.exists() and beside(out) == []
    monkeypatch.undo()
    assert run_cli("train", config_file(), "-o", out, "-q") == 0       # the rerun is not refused


def test_a_train_that_fails_after_an_epoch_keeps_only_its_resume_state(tmp_path, config_file, monkeypatch, run_cli,
                                                                       capsys):
    out = tmp_path / "c"
    fail_at_step(monkeypatch, 15)                          # 10 steps per epoch: the epoch-1 resume point exists
    assert run_cli("train", config_file(), "-o", out, "-q") == 2
    err = capsys.readouterr().err
    assert "kept its resume state" in err and "--resume continues it" in err
    assert (out / "net_0" / "resume-step-10").is_dir() and not (out / "pair.json").exists()
    monkeypatch.undo()
    assert run_cli("train", config_file(), "-o", out, "--resume", "-q") == 0
    assert (out / "pair.json").is_file()


@pytest.mark.parametrize("command", ["align", "merge", "evaluate"])
def test_a_failed_align_merge_or_evaluate_leaves_no_output_folder(command, tiny_pair, tmp_path, monkeypatch,
                                                                   run_cli, capsys):
    from hf_permerge.merging import PermMerger

    def out_of_memory(*args, **kwargs):
        raise MemoryError("cannot allocate")
    monkeypatch.setattr(PermMerger, "align", out_of_memory)
    out = tmp_path / "new" / command
    assert run_cli(command, tiny_pair, "-o", out, "-q") == 2
    assert "cannot allocate" in capsys.readouterr().err
    assert not out.exists() and beside(out) == []


# -- 5: one writer per folder ------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(
        tmp_path, config_file, run_cli, capsys):
    out = tmp_path / "c"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time\nfrom hf_permerge.io_utils import folder_lock\n"
                               f"with folder_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_cli("train", config_file(), "-o", out, "-q") == 2
        err = capsys.readouterr().err
        assert f"being written by another hf-permerge process (PID {holder.pid})" in err and err.count("\n") == 1
        assert not out.exists()
    finally:
        holder.kill()                                      # SIGKILL: its lock file stays behind, stale
        holder.wait()
    assert (tmp_path / ".c.lock").exists()
    assert run_cli("train", config_file(), "-o", out, "-q") == 0
    assert (out / "pair.json").is_file() and beside(out) == []


def test_two_writers_started_at_once_leave_one_consistent_pair_and_one_refusal(tmp_path, config_file):
    """The issue's case: `train CFG -o c`; once c/net_1/init exists, `train CFG -o c --overwrite` with another
    seed. The second is refused (naming the first's PID) and the pair is the first's, whole."""
    out = tmp_path / "c"
    exe = [sys.executable, "-m", "hf_permerge.cli"]
    first = subprocess.Popen([*exe, "train", str(config_file(epochs=200)), "-o", str(out), "-q"],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "net_1" / "init").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run([*exe, "train", str(config_file(seed=99, max_steps=5)), "-o", str(out), "--overwrite",
                             "-q"], capture_output=True, text=True, timeout=300)
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    assert second.returncode == 2 and f"(PID {first.pid})" in second.stderr
    pair = json.loads((out / "pair.json").read_text())
    assert pair["config"]["training"]["seed"] == 0 and pair["config"] == json.loads(
        (out / "run_config.json").read_text())
    assert beside(out) == []
