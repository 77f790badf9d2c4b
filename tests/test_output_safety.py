"""Output folders: nothing a user made is lost or written into, and a killed run of ours does not block a rerun."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hf_permerge.io_utils import check_output_dir, write_json_atomic

EXE = str(Path(sys.executable).parent / "hf-permerge")


def users_folder(tmp_path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


def test_resume_refuses_a_folder_that_is_not_ours(tmp_path):
    folder = users_folder(tmp_path)
    with pytest.raises(FileExistsError, match="refusing to continue in it with --resume"):
        check_output_dir(folder, resume=True, marker="run_config.json", resumable=True)
    with pytest.raises(FileExistsError, match="refusing to delete it even with --overwrite"):
        check_output_dir(folder, overwrite=True, marker="run_config.json")
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_the_resume_hint_is_given_only_where_resume_exists(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "report.json").write_text("{}")
    with pytest.raises(FileExistsError) as err:
        check_output_dir(folder, marker="report.json")
    assert "--resume" not in str(err.value)
    with pytest.raises(FileExistsError, match="or --resume"):
        check_output_dir(folder, marker="report.json", resumable=True)


def test_leftovers_of_a_killed_run_do_not_block_a_rerun(tmp_path):
    folder = tmp_path / "out"
    (folder / ".plots-abc123_x").mkdir(parents=True)
    (folder / ".plots-abc123_x" / "interpolation.png").write_bytes(b"x")
    (folder / ".merged.tmp-k2j4h5g6").mkdir()
    (folder / ".report.json.tmp-q1w2e3r4").write_text("{")
    (folder / ".permutations-a1b2c3d4.safetensors.tmp").write_bytes(b"")
    check_output_dir(folder, marker="report.json")
    assert list(folder.iterdir()) == []
    (folder / ".plots-defghijk").mkdir()
    (folder / "notes.txt").write_text("mine")  # a user's file beside them: refused, nothing removed
    with pytest.raises(FileExistsError):
        check_output_dir(folder, overwrite=True, marker="report.json")
    assert {p.name for p in folder.iterdir()} == {".plots-defghijk", "notes.txt"}


@pytest.mark.parametrize("name", [".env.tmp", ".old-thesis", ".bashrc.old", ".plots-keep", ".tmp", ".x.tmp-short"])
def test_hidden_files_that_only_look_temporary_are_never_cleared(tmp_path, name):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / name).write_text("mine")
    with pytest.raises(FileExistsError):
        check_output_dir(folder, marker="report.json")
    assert (folder / name).read_text() == "mine"


def test_run_overwrite_deletes_only_a_run_folder(tmp_path):
    """A folder holding a merged model of ours beside a user's files is not a run output: never deleted."""
    from hf_permerge.reporting.pipeline import RUN_MARKER

    folder = users_folder(tmp_path)
    (folder / "merged").mkdir()
    (folder / "merged" / "merge_config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="refusing to delete"):
        check_output_dir(folder, overwrite=True, marker=RUN_MARKER, resumable=True)


def test_write_json_atomic_leaves_no_temporary_file_on_failure(tmp_path):
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "r.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_cli_flags_after_the_subcommand_and_exclusive_modes():
    from hf_permerge.cli import build_parser

    p = build_parser()
    assert p.parse_args(["run", "c.yaml", "-o", "x", "-q"]).quiet
    assert p.parse_args(["-q", "run", "c.yaml", "-o", "x"]).quiet
    assert not p.parse_args(["run", "c.yaml", "-o", "x"]).quiet
    with pytest.raises(SystemExit):
        p.parse_args(["run", "c.yaml", "-o", "x", "--overwrite", "--resume"])
    r = subprocess.run([EXE, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("hf-permerge ")


def test_evaluate_refuses_overrides_of_how_the_pair_was_made(tiny_pair, tmp_path):
    r = subprocess.run(
        [
            EXE,
            "-q",
            "evaluate",
            str(tiny_pair),
            "-o",
            str(tmp_path / "ev"),
            "--set",
            "model.width=64",
            "--set",
            "training.epochs=99",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "evaluate cannot override 'model.width=64', 'training.epochs=99'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "ev").exists()


def test_sigterm_unwinds_so_temporary_folders_are_removed(tmp_path):
    """`timeout` sends SIGTERM: the CLI exits through its cleanup (128 + 15), like Ctrl-C."""
    code = (
        "import sys, time, tempfile\n"
        "from hf_permerge.cli import main\n"
        "import hf_permerge.cli as cli\n"
        "def slow(args):\n"
        f"    with tempfile.TemporaryDirectory(dir={str(tmp_path)!r}, prefix='.plots-'):\n"
        "        print('ready', flush=True)\n"
        "        time.sleep(60)\n"
        "cli.commands.COMMANDS['train'] = slow\n"
        "sys.exit(main(['train', 'c.yaml', '-o', 'x']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert (
        "hf-permerge train: terminated (SIGTERM); nothing half-written was left; --resume continues it from the "
        "last epoch end" in proc.stderr.read()
    )


def test_outputs_get_the_modes_of_ordinary_new_files_and_folders(tmp_path):
    """Temporary files and folders start private (0600 / 0700); what they become is readable like any output."""
    import os
    import stat

    import torch

    from hf_permerge.alignment.permutations import Permutations
    from hf_permerge.io_utils import atomic_dir, dir_mode, file_mode

    write_json_atomic(tmp_path / "r.json", {"a": 1})
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "x.txt").write_text("x")
    Permutations({"hidden.0": torch.arange(4)}).save(tmp_path / "p.safetensors")
    assert (file_mode(), dir_mode()) != (0o600, 0o700)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == file_mode()
    assert stat.S_IMODE((tmp_path / "p.safetensors").stat().st_mode) == file_mode()
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == dir_mode()
    from hf_permerge.models import PermMLPConfig, PermMLPForImageClassification
    from hf_permerge.models.folders import write_model_files

    (tmp_path / "model").mkdir()
    write_model_files(PermMLPForImageClassification(PermMLPConfig(depth=1, width=8)), tmp_path / "model")
    assert {stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "model").iterdir()} == {
        file_mode()
    }  # safetensors: 0600
    before = os.umask(0o077)  # a private umask is honoured, not the one at import
    try:
        write_json_atomic(tmp_path / "private.json", {})
        assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    finally:
        os.umask(before)


def test_errors_are_one_line_and_verbose_adds_the_traceback(tmp_path, capsys):
    from hf_permerge.cli import main

    assert main(["merge", str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert main(["merge", str(tmp_path / "missing"), "-o", str(tmp_path / "out"), "-v"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_overwrite_replaces_only_our_output_never_a_users_files_kept_inside_it(tiny_pair, tmp_path, capsys, run_cli):
    """--overwrite replaces a whole folder of ours: one that also holds a user's file (or another command's output
    saved inside it) is refused, naming it, before any work; without the file it is replaced as before."""
    from hf_permerge.reporting.pipeline import RUN_CONTENTS, RUN_MARKER
    from hf_permerge.sweeps.runner import SWEEP_CONTENTS
    from hf_permerge.training.trainer import PAIR_CONTENTS

    merged, perms = tmp_path / "merged", tmp_path / "perms"
    assert run_cli("merge", tiny_pair, "-o", merged, "-q") == 0
    assert run_cli("align", tiny_pair, "-o", perms, "-q") == 0
    for folder, command in ((merged, "merge"), (perms, "align")):
        (folder / "analysis.ipynb").write_text("mine")
        assert run_cli(command, tiny_pair, "-o", folder, "--overwrite", "-q") == 2
        err = capsys.readouterr().err
        assert "also analysis.ipynb, which it does not consist of" in err and "move that out of it first" in err
        assert (folder / "analysis.ipynb").read_text() == "mine"
        (folder / "analysis.ipynb").unlink()
        assert run_cli(command, tiny_pair, "-o", folder, "--overwrite", "-q") == 0

    report = tmp_path / "report"  # evaluate replaces its merged/ at the end: refused up front
    (report / "merged").mkdir(parents=True)
    (report / "report.json").write_text("{}")
    (report / "merged" / "merge_config.json").write_text("{}")
    (report / "merged" / "notes.md").write_text("mine")
    assert run_cli("evaluate", tiny_pair, "-o", report, "--overwrite", "-q") == 2
    assert "also notes.md" in capsys.readouterr().err and (report / "merged" / "notes.md").read_text() == "mine"

    for marker, contents, ours in (
        ("run_config.json", PAIR_CONTENTS, ("net_0", "pair.json")),
        (RUN_MARKER, RUN_CONTENTS, ("pair", "report.json", "interpolation.png")),
        ("sweep.json", SWEEP_CONTENTS, ("cells", "results.csv", "fig2.png")),
    ):
        folder = tmp_path / marker.replace("/", "_")
        for name in ours:
            (folder / name).mkdir(parents=True) if "." not in name else (folder / name).write_text("")
        (folder / marker).parent.mkdir(parents=True, exist_ok=True)
        (folder / marker).write_text("{}")
        check_output_dir(folder, overwrite=True, marker=marker, contents=contents)
        (folder / "merged_by_me").mkdir()
        with pytest.raises(FileExistsError, match="and also merged_by_me, which it does not consist of"):
            check_output_dir(folder, overwrite=True, marker=marker, contents=contents)


def test_a_bad_override_of_evaluate_is_named_as_one(tiny_pair, tmp_path, capsys, run_cli):
    assert run_cli("evaluate", tiny_pair, "-o", tmp_path / "ev", "--set", "evaluation.num_lambda=3", "-q") == 2
    err = capsys.readouterr().err
    assert "pair.json with the --set overrides:" in err and "did you mean 'num_lambdas'" in err
    assert not (tmp_path / "ev").exists()


MEANINGLESS = [
    ("train", ["training.epochs=0"], "training.epochs"),
    ("run", ["training.epochs=0"], "training.epochs"),
    ("run", ["training.num_nets=1"], "training.num_nets 1"),
    ("train", ["training.batch_size=5000"], "training.batch_size 5000 is larger than the 1000 training images"),
    ("train", ["training.save_steps=[5,500]"], "training.save_steps [500] lie beyond the run's last step (20"),
    ("run", ["alignment.checkpoint=step-7"], "alignment.checkpoint step-7 is not saved"),
    ("run", ["alignment.checkpoint=last"], "alignment.checkpoint"),
    ("run", ["evaluation.splits=[]"], "evaluation.splits"),
]


@pytest.mark.parametrize("command, overrides, message", MEANINGLESS, ids=[" ".join(c[1]) for c in MEANINGLESS])
def test_a_job_that_would_be_meaningless_is_refused_before_any_work(
    command, overrides, message, tiny_fmnist, tmp_path, capsys, run_cli, monkeypatch
):
    from hf_permerge.training import trainer

    monkeypatch.setattr(trainer.PairTrainer, "_train_slots", lambda *a: pytest.fail("trained before refusing"))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: {{type: mlp, depth: 1, width: 8}}\ndata: {{data_dir: {tiny_fmnist}}}\n"
        "training: {epochs: 2, batch_size: 100, save_steps: [5]}\n"
    )
    sets = [x for o in overrides for x in ("--set", o)]
    assert run_cli(command, config, "-o", tmp_path / "out", *sets, "-q") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) <= 2, err
    assert not (tmp_path / "out").exists()
