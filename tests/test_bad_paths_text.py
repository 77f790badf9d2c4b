"""Output paths on the text paths: never inside an input nor replacing one, long names, links, the lock taken before
any work, and what a killed writer left removed on the next run."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
from bad_inputs import save_pair
from test_bad_input_text import assert_one_line, left_beside, snapshot

from hf_permerge import PermMerger
from hf_permerge.merging import offloaded
from hf_permerge.merging.streamed import merge_streamed


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"))


@pytest.mark.parametrize("streamed", [False, True])
def test_an_output_inside_an_input_is_refused(pair, run_cli, capsys, streamed):
    before, out = snapshot(pair["a"], pair["b"]), pair["a"] / "merged"
    capsys.readouterr()
    flags = ["--streamed"] * streamed
    assert run_cli("merge", pair["a"], pair["b"], "--matcher", "weight", *flags, "-q", "-o", out) == 2
    assert_one_line(capsys.readouterr().err, "lies inside the input")
    with pytest.raises(ValueError, match="lies inside the input"):
        if streamed:
            merge_streamed(pair["a"], pair["b"], out, progress=False, log=lambda _: None)
        else:
            PermMerger.from_pretrained([pair["a"], pair["b"]]).save_pretrained(out)
    assert snapshot(pair["a"], pair["b"]) == before


@pytest.mark.parametrize("streamed", [False, True])
def test_overwrite_never_replaces_an_input(pair, tmp_path, run_cli, capsys, streamed):
    merged = tmp_path / "merged"
    flags = ["--matcher", "weight", "-q"] + ["--streamed"] * streamed
    assert run_cli("merge", pair["a"], pair["b"], *flags, "-o", merged) == 0
    before = snapshot(merged)
    capsys.readouterr()
    assert run_cli("merge", merged, pair["b"], *flags, "-o", merged, "--overwrite") == 2
    assert_one_line(capsys.readouterr().err, f"output folder {merged} is the input {merged}")
    assert snapshot(merged) == before


def test_a_long_folder_name_merges_and_leaves_nothing_beside_it(pair, tmp_path, run_cli):
    out = tmp_path / ("m" * 250)
    for flags in ([], ["--streamed"]):
        assert (
            run_cli("merge", pair["a"], pair["b"], "--matcher", "weight", *flags, "-q", "-o", out, "--overwrite") == 0
        )
        assert (out / "merge_config.json").is_file() and left_beside(out) == [out.name]


def test_overwrite_through_a_link_replaces_its_target_and_keeps_the_link(pair, tmp_path, run_cli, caplog):
    real, link = tmp_path / "real", tmp_path / "link"
    assert run_cli("merge", pair["a"], pair["b"], "-q", "--vanilla", "-o", real) == 0
    link.symlink_to(real)
    assert run_cli("merge", pair["a"], pair["b"], "--matcher", "weight", "-q", "-o", link, "--overwrite") == 0
    assert f"{link} is a link to {real}: writing the output there" in caplog.text
    assert link.is_symlink() and link.resolve() == real
    assert (real / "permutations").is_dir()  # the new, aligned merge (the vanilla one had none)
    assert left_beside(real) == ["real"]


@pytest.mark.parametrize("streamed", [False, True])
def test_what_a_killed_writer_left_is_removed_on_the_next_run(pair, tmp_path, run_cli, streamed):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".out.lock").write_text(dead.stdout)
    (tmp_path / ".out.tmp-k2j4h5g6").mkdir()
    (tmp_path / ".out.tmp-k2j4h5g6" / "model.safetensors").write_bytes(b"x" * 1000)
    flags = ["--streamed"] * streamed
    assert run_cli("merge", pair["a"], pair["b"], "--matcher", "weight", *flags, "-q", "-o", out) == 0
    assert left_beside(out) == ["out"]


HOLD = (
    "import sys, time; from hf_permerge.io_utils import folder_lock; held = folder_lock(sys.argv[1]); "
    "held.__enter__(); print(1, flush=True); time.sleep(60)"
)


def test_streamed_takes_the_lock_before_any_work(pair, tmp_path, run_cli, capsys, monkeypatch):
    from hf_permerge.merging import streamed

    read = []
    monkeypatch.setattr(streamed, "load_config", lambda folder: read.append(folder))
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # the other writer holds the lock
        assert run_cli("merge", pair["a"], pair["b"], "--streamed", "-q", "-o", out) == 2
    finally:
        holder.kill()
        holder.wait()
    assert_one_line(capsys.readouterr().err, f"is being written by another hf-permerge process (PID {holder.pid})")
    assert read == [] and not out.exists()


def test_offload_folders_of_a_gone_process_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tempfile.mkdtemp(prefix=f"{offloaded.OFFLOAD_PREFIX}{dead.stdout.strip()}-")
    live = tempfile.mkdtemp(prefix=f"{offloaded.OFFLOAD_PREFIX}{os.getpid()}-")
    try:
        offloaded.remove_dead_offload_folders()
        assert not os.path.exists(gone) and os.path.isdir(live)
    finally:
        os.rmdir(live)


def test_long_names_get_distinct_hidden_names_under_255_bytes():
    from hf_permerge.io_utils import hidden_name

    one, two = hidden_name("é" * 125 + "a", ".lock"), hidden_name("é" * 125 + "b", ".lock")
    assert one != two and len(one.encode()) <= 255 and len(two.encode()) <= 255
    assert hidden_name("out", ".tmp-") == ".out.tmp-"


def test_a_small_disk_is_said_in_units_that_keep_a_digit():
    from hf_permerge.merging.budget import size_text

    assert [size_text(n) for n in (5 * 10**6, 3 * 2**30, 2048, 12)] == ["4.8 MiB", "3.0 GiB", "2.0 KiB", "12 bytes"]
