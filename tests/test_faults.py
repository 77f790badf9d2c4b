"""Faults: a failed job loses nothing a user had and leaves nothing it made; one writer per output folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes' hash: 'exactly as it was' is equality of two snapshots."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def beside(folder: Path) -> list[str]:
    """What lies next to `folder` besides it: a job's staging folder or lock file must not be left there."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}"))


@pytest.fixture
def config_file(tmp_path, tiny_fmnist):
    def write(**training):
        path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "model": {"type": "mlp", "depth": 1, "width": 32},
                    "data": {"dataset": "fashion_mnist", "data_dir": str(tiny_fmnist)},
                    "training": {"num_nets": 2, "seed": 0, "epochs": 2, "save_steps": [5], **training},
                    "alignment": {"num_examples": 500},
                    "evaluation": {"train_subset": 500, "num_lambdas": 3, "n_way": False, "plots": False},
                }
            )
        )
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


def test_train_overwrite_that_fails_mid_run_keeps_the_old_pair(
    tiny_pair, tmp_path, config_file, monkeypatch, run_cli, capsys
):
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
def test_align_merge_evaluate_overwrite_that_fails_keeps_the_old_output(
    command, tiny_pair, tmp_path, monkeypatch, run_cli, capsys
):
    from hf_permerge.merging import PermMerger

    out = tmp_path / command
    if command == "evaluate":
        fake_run_folder(tiny_pair, out)
        (out / "merged").mkdir()
        (out / "merged" / "merge_config.json").write_text("{}")
        pair = out / "pair"  # evaluate a run's own pair again, into the run folder
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
    assert (
        run_cli(
            "evaluate",
            out / "pair",
            "-o",
            out,
            "--overwrite",
            "-q",
            "--set",
            "evaluation.num_lambdas=3",
            "--set",
            "evaluation.n_way=false",
            "--set",
            "alignment.num_examples=200",
            "--set",
            "evaluation.plots=false",
        )
        == 0
    )
    assert snapshot(out / "pair") == pair_before
    assert json.loads((out / "report.json").read_text())["pair"] == str(out / "pair").lstrip("/").split("/")[
        -1
    ] or "made" not in json.loads((out / "report.json").read_text())
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


def test_a_train_that_fails_before_any_resume_point_leaves_nothing(tmp_path, config_file, monkeypatch, run_cli, capsys):
    out = tmp_path / "c"
    fail_at_step(monkeypatch, 3)
    assert run_cli("train", config_file(), "-o", out, "-q") == 2
    err = capsys.readouterr().err
    assert "cannot allocate" in err and "nothing it made was left" in err
    assert not out.exists() and beside(out) == []
    monkeypatch.undo()
    assert run_cli("train", config_file(), "-o", out, "-q") == 0  # the rerun is not refused


def test_a_train_that_fails_after_an_epoch_keeps_only_its_resume_state(
    tmp_path, config_file, monkeypatch, run_cli, capsys
):
    out = tmp_path / "c"
    fail_at_step(monkeypatch, 15)  # 10 steps per epoch: the epoch-1 resume point exists
    assert run_cli("train", config_file(), "-o", out, "-q") == 2
    err = capsys.readouterr().err
    assert "kept its resume state" in err and "--resume continues it" in err
    assert (out / "net_0" / "resume-step-10").is_dir() and not (out / "pair.json").exists()
    monkeypatch.undo()
    assert run_cli("train", config_file(), "-o", out, "--resume", "-q") == 0
    assert (out / "pair.json").is_file()


@pytest.mark.parametrize("command", ["align", "merge", "evaluate"])
def test_a_failed_align_merge_or_evaluate_leaves_no_output_folder(
    command, tiny_pair, tmp_path, monkeypatch, run_cli, capsys
):
    from hf_permerge.merging import PermMerger

    def out_of_memory(*args, **kwargs):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(PermMerger, "align", out_of_memory)
    out = tmp_path / "new" / command
    assert run_cli(command, tiny_pair, "-o", out, "-q") == 2
    assert "cannot allocate" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # nor the parent folder made for it


# -- 5: one writer per folder ------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(
    tmp_path, config_file, run_cli, capsys
):
    out = tmp_path / "c"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom hf_permerge.io_utils import folder_lock\n"
            f"with folder_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_cli("train", config_file(), "-o", out, "-q") == 2
        err = capsys.readouterr().err
        assert f"being written by another hf-permerge process (PID {holder.pid})" in err and err.count("\n") == 1
        assert not out.exists()
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind, stale
        holder.wait()
    assert (tmp_path / ".c.lock").exists()
    assert run_cli("train", config_file(), "-o", out, "-q") == 0
    assert (out / "pair.json").is_file() and beside(out) == []


def test_two_writers_started_at_once_leave_one_consistent_pair_and_one_refusal(tmp_path, config_file):
    """The issue's case: `train CFG -o c`; once c/net_1/init exists, `train CFG -o c --overwrite` with another
    seed. The second is refused (naming the first's PID) and the pair is the first's, whole."""
    out = tmp_path / "c"
    exe = [sys.executable, "-m", "hf_permerge.cli"]
    first = subprocess.Popen(
        [*exe, "train", str(config_file(epochs=200)), "-o", str(out), "-q"], stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while not (out / "net_1" / "init").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # the first holds its lock, mid-run, however fast this machine is
    try:
        second = subprocess.run(
            [*exe, "train", str(config_file(seed=99, max_steps=5)), "-o", str(out), "--overwrite", "-q"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    assert second.returncode == 2 and f"(PID {first.pid})" in second.stderr
    pair = json.loads((out / "pair.json").read_text())
    assert pair["config"]["training"]["seed"] == 0 and pair["config"] == json.loads(
        (out / "run_config.json").read_text()
    )
    assert beside(out) == []


# -- 1: finite or refused -----------------------------------------------------------------------------------------


def test_training_that_diverges_stops_with_one_line_naming_net_step_and_fix(tmp_path, config_file, run_cli, capsys):
    out = tmp_path / "c"
    assert run_cli("train", config_file(lr=1e30), "-o", out, "-q") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training loss became non-finite" in err and "at step " in err
    assert "lower the learning rate" in err and "--set training.lr=1e+29" in err
    assert not out.exists()  # no resume point yet: nothing is left


def test_training_that_diverges_after_an_epoch_keeps_its_last_finite_resume_point(
    tmp_path, config_file, monkeypatch, run_cli, capsys
):
    import torch
    from safetensors.torch import load_file

    from hf_permerge.training import trainer

    make = trainer.make_engine

    def diverging(*args, **kwargs):
        engine, calls = make(*args, **kwargs), [0]
        original = engine.step

        def step(*a):
            calls[0] += 1
            loss = original(*a)
            return loss * float("nan") if calls[0] >= 13 else loss

        engine.step = step
        return engine

    monkeypatch.setattr(trainer, "make_engine", diverging)
    out = tmp_path / "c"
    assert run_cli("train", config_file(), "-o", out, "-q") == 2
    err = capsys.readouterr().err
    assert "at step 13" in err and "kept its resume state" in err
    assert sorted(p.name for p in (out / "net_0").iterdir()) == ["init", "resume-step-10", "step-5"]
    state = load_file(str(out / "net_0" / "resume-step-10" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())


def test_merge_refuses_to_save_a_model_with_a_nan_weight(tiny_pair, tmp_path, run_cli, capsys):
    from safetensors.torch import load_file, save_file

    pair = tmp_path / "pair"
    shutil.copytree(tiny_pair, pair)
    path = pair / "net_1" / "final" / "model.safetensors"
    state = load_file(str(path))
    name = next(k for k in state if k.endswith("weight"))
    state[name][0, 0] = float("nan")
    save_file(state, str(path), metadata={"format": "pt"})
    out = tmp_path / "m"
    assert run_cli("merge", pair, "--vanilla", "-o", out, "-q") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds NaN or inf" in err and name in err
    assert not out.exists() and beside(out) == []


def test_json_written_is_strict_and_a_non_finite_number_is_named(tmp_path):
    from hf_permerge.io_utils import write_json_atomic

    with pytest.raises(ValueError, match=r"nets\[1\]\.test\.loss \(nan\) is not a finite number"):
        write_json_atomic(tmp_path / "pair.json", {"nets": [{"test": {"loss": 1.0}}, {"test": {"loss": float("nan")}}]})
    assert list(tmp_path.iterdir()) == []
    write_json_atomic(tmp_path / "ok.json", {"a": [1.5, None]})
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": [1.5, None]}


# -- every file the tool reads is validated ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        "{bad json",
        "[1, 2]",
        '{"num_nets": "two", "config": {}}',
        '{"num_nets": 0, "config": {}}',
        '{"num_nets": NaN, "config": {}}',
    ],
)
def test_a_malformed_pair_json_is_refused_naming_the_file(damage, tiny_pair, tmp_path, run_cli, capsys):
    pair = tmp_path / "pair"
    shutil.copytree(tiny_pair, pair)
    (pair / "pair.json").write_text(damage)
    assert run_cli("merge", pair, "--vanilla", "-o", tmp_path / "m", "-q") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{pair / 'pair.json'}" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_malformed_alignment_merge_config_and_trainer_state_files_are_refused_naming_them(
    tiny_pair, tmp_path, config_file, monkeypatch, run_cli, capsys
):
    perms = tmp_path / "perms"
    assert run_cli("align", tiny_pair, "-o", perms, "--matcher", "weight", "-q") == 0
    (perms / "alignment.json").write_text('{"fingerprints": "abc"}')
    assert run_cli("merge", tiny_pair, "--permutations", perms, "-o", tmp_path / "m", "-q") == 2
    err = capsys.readouterr().err
    assert f"{perms / 'alignment.json'} is malformed: fingerprints" in err and err.count("\n") == 1

    merged = tmp_path / "merged"
    assert run_cli("merge", tiny_pair, "--matcher", "weight", "-o", merged, "-q") == 0
    (merged / "merge_config.json").write_text("{")
    assert run_cli("merge", tiny_pair, "--permutations", merged / "permutations", "-o", tmp_path / "m2", "-q") == 2
    assert f"{merged / 'merge_config.json'} is not valid JSON" in capsys.readouterr().err

    fail_at_step(monkeypatch, 15)
    out = tmp_path / "c"
    assert run_cli("train", config_file(), "-o", out, "-q") == 2
    monkeypatch.undo()
    state = out / "net_0" / "resume-step-10" / "trainer_state.json"
    state.write_text('{"step": -3, "optimizer": {}}')
    capsys.readouterr()
    assert run_cli("train", config_file(), "-o", out, "--resume", "-q") == 2
    err = capsys.readouterr().err
    assert f"{state} is malformed: step" in err and err.count("\n") == 1


def test_sigterm_during_train_overwrite_keeps_the_old_pair(tiny_pair, tmp_path, config_file):
    """SIGTERM unwinds like any failure: the new pair being written beside the old one goes, the old one stays."""
    import signal

    pair = tmp_path / "c"
    shutil.copytree(tiny_pair, pair)
    before = snapshot(pair)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hf_permerge.cli",
            "train",
            str(config_file(epochs=200)),
            "-o",
            str(pair),
            "--overwrite",
            "-q",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not list(tmp_path.glob(".c.tmp-*/net_1/init")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert f"terminated (SIGTERM); {pair} is as it was" in proc.stderr.read()
    assert snapshot(pair) == before and beside(pair) == []


# -- 6: the Python API writes as the CLI does: one writer per folder, overwrite replaces on success only ---------


def fast_evaluation(tiny_config):
    return tiny_config(
        alignment={"num_examples": 200},
        evaluation={"train_subset": 200, "num_lambdas": 3, "n_way": False, "plots": False},
    )


def weight_merger(tiny_pair):
    from hf_permerge.merging import PermMerger

    merger = PermMerger.from_pretrained(tiny_pair)
    merger.align(matcher="weight")
    merger.merge(0.5)
    return merger


def raise_on_call(monkeypatch, owner, name: str, call: int = 1):
    """Make `owner.name` raise an allocation error at its `call`-th call (the earlier ones run as usual)."""
    original, calls = getattr(owner, name), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise MemoryError("cannot allocate 2.0 GiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def api_trainer(tiny_pair, tmp_path, tiny_config, monkeypatch):
    from hf_permerge.training import PairTrainer

    pair = tmp_path / "c"
    shutil.copytree(tiny_pair, pair)
    fail_at_step(monkeypatch, 3)
    return pair, lambda: PairTrainer(tiny_config(), pair, overwrite=True, progress=False).train()


def api_save_pretrained(tiny_pair, tmp_path, tiny_config, monkeypatch):
    from hf_permerge.merging import saving

    merger, out = weight_merger(tiny_pair), tmp_path / "merged"
    merger.save_pretrained(out)
    raise_on_call(monkeypatch, saving, "model_card")  # the weights are written by then
    return out, lambda: merger.save_pretrained(out, merger.merge(0.3), overwrite=True)


def api_save_permutations(tiny_pair, tmp_path, tiny_config, monkeypatch):
    from hf_permerge.alignment import Permutations

    merger, out = weight_merger(tiny_pair), tmp_path / "perms"
    merger.save_permutations(out)
    raise_on_call(monkeypatch, Permutations, "save", call=2)  # net_0's file is written by then
    return out, lambda: merger.save_permutations(out)


def api_evaluate_pair(tiny_pair, tmp_path, tiny_config, monkeypatch):
    from hf_permerge.merging import PermMerger
    from hf_permerge.reporting.pipeline import evaluate_pair

    out = fake_run_folder(tiny_pair, tmp_path / "r")
    (out / "merged").mkdir()
    (out / "merged" / "merge_config.json").write_text("{}")
    raise_on_call(monkeypatch, PermMerger, "save_permutations")  # the last write: merged/ and report.json are done
    return out, lambda: evaluate_pair(out / "pair", out, fast_evaluation(tiny_config), overwrite=True, progress=False)


def api_run(tiny_pair, tmp_path, tiny_config, monkeypatch):
    from hf_permerge.reporting.pipeline import run

    out = fake_run_folder(tiny_pair, tmp_path / "r")
    fail_at_step(monkeypatch, 3)
    return out, lambda: run(fast_evaluation(tiny_config), out, overwrite=True, progress=False)


def api_run_sweep(tiny_pair, tmp_path, tiny_config, monkeypatch):
    from hf_permerge.sweeps import load_sweep_config, run_sweep, runner

    sweep = tmp_path / "s"
    (sweep / "cells" / "a").mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    (sweep / "cells" / "a" / "result.json").write_text("{}")
    config = load_sweep_config(
        Path("configs/sweeps/fig2_fmnist_smoke.yaml"),
        [f"data.data_dir={tiny_config().data.data_dir}", "sweep.stack_seeds=false"],
    )

    def second_cell_fails(cell, config, output_dir, *args, **kwargs):
        if cell.id == config.cells[1].id:
            raise MemoryError("cannot allocate 2.0 GiB")
        (Path(output_dir) / "cells" / cell.id).mkdir(parents=True)
        (Path(output_dir) / "cells" / cell.id / "result.json").write_text("{}")
        return "done"

    monkeypatch.setattr(runner, "run_cell", second_cell_fails)
    return sweep, lambda: run_sweep(config, sweep, overwrite=True, progress=False)


@pytest.mark.parametrize(
    "case",
    [api_trainer, api_save_pretrained, api_save_permutations, api_evaluate_pair, api_run, api_run_sweep],
    ids=lambda case: case.__name__.removeprefix("api_"),
)
def test_an_api_overwrite_that_fails_midway_keeps_the_old_output(case, tiny_pair, tmp_path, tiny_config, monkeypatch):
    out, act = case(tiny_pair, tmp_path, tiny_config, monkeypatch)
    before = snapshot(out)
    with pytest.raises(MemoryError, match="cannot allocate") as err:
        act()
    assert snapshot(out) == before and beside(out) == []
    assert err.value.hf_permerge_outcome == f"{out} is as it was (the new output was not swapped in)"


def test_an_api_overwrite_that_succeeds_replaces_the_old_output(tiny_pair, tmp_path):
    merger, out = weight_merger(tiny_pair), tmp_path / "merged"
    merger.save_pretrained(out)
    before = snapshot(out)
    merger.save_pretrained(out, merger.merge(0.3), overwrite=True)
    assert snapshot(out) != before and json.loads((out / "merge_config.json").read_text())["merge"]["alpha"] == 0.3
    assert beside(out) == []


def test_an_api_writer_is_refused_while_another_process_writes_the_folder(tiny_pair, tiny_config, tmp_path):
    from hf_permerge.training import PairTrainer

    merger = weight_merger(tiny_pair)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom hf_permerge.io_utils import folder_lock\n"
            "locks = [folder_lock(out) for out in sys.argv[1:]]\nfor lock in locks:\n    lock.__enter__()\n"
            "print('held', flush=True)\ntime.sleep(600)",
            *(str(tmp_path / name) for name in ("merged", "perms", "c")),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = f"being written by another hf-permerge process \\(PID {holder.pid}\\)"
        with pytest.raises(FileExistsError, match=refused):
            merger.save_pretrained(tmp_path / "merged")
        with pytest.raises(FileExistsError, match=refused):
            merger.save_permutations(tmp_path / "perms")
        with pytest.raises(FileExistsError, match=refused):
            PairTrainer(tiny_config(), tmp_path / "c", progress=False).train()
        assert sorted(p.name for p in tmp_path.iterdir()) == [".c.lock", ".merged.lock", ".perms.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_an_api_training_that_fails_keeps_only_its_resume_state_and_says_so(tiny_config, tmp_path, monkeypatch):
    from hf_permerge.training import PairTrainer

    out = tmp_path / "c"
    fail_at_step(monkeypatch, 3)
    with pytest.raises(MemoryError) as err:
        PairTrainer(tiny_config(), out, progress=False).train()
    assert not out.exists() and beside(out) == []
    assert err.value.hf_permerge_outcome == f"nothing it made was left in {out}"
    monkeypatch.undo()
    fail_at_step(monkeypatch, 15)
    with pytest.raises(MemoryError) as err:
        PairTrainer(tiny_config(), out, progress=False).train()
    assert err.value.hf_permerge_outcome == f"kept its resume state in {out}: resume=True continues it"
    monkeypatch.undo()
    PairTrainer(tiny_config(), out, resume=True, progress=False).train()
    assert (out / "pair.json").is_file() and beside(out) == []


# -- 1 (continued): a non-finite loss stops the run within seconds, not at its epoch's end --------------------------


def loss_turns_nan(monkeypatch, net: int, from_step: int) -> list[int]:
    """Make net `net`'s training loss NaN from optimiser step `from_step` on; returns the count of steps taken."""
    from hf_permerge.training import trainer

    make, calls = trainer.make_engine, [0]

    def diverging(*args, **kwargs):
        engine = make(*args, **kwargs)
        original = engine.step

        def step(*a):
            calls[0] += 1
            loss = original(*a)
            return torch.where(torch.arange(len(loss)) == net, float("nan"), loss) if calls[0] >= from_step else loss

        engine.step = step
        return engine

    monkeypatch.setattr(trainer, "make_engine", diverging)
    return calls


def test_a_loss_that_turns_nan_mid_epoch_stops_at_the_next_refresh_naming_net_and_first_bad_step(
    tiny_config, tmp_path, monkeypatch
):
    from hf_permerge.training import trainer

    monkeypatch.setattr(trainer, "FINITE_CHECK_S", 0.0)  # every step is a refresh: the check's place, not its timing
    steps = loss_turns_nan(monkeypatch, net=1, from_step=7)
    config = tiny_config(training={"epochs": 1, "batch_size": 10, "save_steps": []})  # 100 steps in the epoch
    with pytest.raises(
        trainer.TrainingDiverged, match=r"^net 1's training loss became non-finite \(NaN or inf\) at step 7:"
    ):
        trainer.PairTrainer(config, tmp_path / "c", progress=False).train()
    assert steps[0] == 7 and not (tmp_path / "c").exists()


def test_the_finite_check_reads_the_device_at_refreshes_saved_steps_and_epoch_ends_only(
    tiny_config, tmp_path, monkeypatch
):
    """Between refreshes a step never waits on the device: the flag stays there, read once per check."""
    from hf_permerge.training import trainer

    monkeypatch.setattr(trainer, "FINITE_CHECK_S", 1e9)  # no refresh comes due in this run
    checks = []
    original = trainer.PairTrainer._check_finite
    monkeypatch.setattr(
        trainer.PairTrainer, "_check_finite", lambda self, *a: (checks.append(1), original(self, *a))[1]
    )
    trainer.PairTrainer(tiny_config(), tmp_path / "c", progress=False).train()  # 2 epochs of 10 steps, step 5 saved
    assert len(checks) == 3
