"""The battery of bad inputs on the text paths (tiny LLaMA folders, one file and sharded): every case, on the command
line in memory and `--streamed`, and through the API, is refused with exactly one line naming the problem, leaves
nothing in or beside the output folder, and leaves the inputs byte-identical. No model folder's code ever runs,
even with `y` piped to the command."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bad_inputs import DATA_CASES, FOLDER_CASES, save_pair

from hf_permerge import PermMerger
from hf_permerge.merging.streamed import merge_streamed

REFUSED = (ValueError, OSError, RuntimeError)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"))


def snapshot(*folders: Path) -> dict:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*")) if p.is_file()
    }


def left_beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}"))


def case_folders(pair, tmp_path, fault, sharded: bool) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(pair["as" if sharded else "a"], a)
    shutil.copytree(pair["bs" if sharded else "b"], b)
    fault(b)
    return a, b


def assert_one_line(err: str, named: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert named in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


PATHS = ["merge", "merge --streamed", "api", "api streamed"]


def run(path: str, a: Path, b: Path, out: Path, run_cli, capsys, extra=()) -> str:
    """Run one path on (a, b) into `out`; return the single line (CLI) or message (API) of its refusal."""
    if path.startswith("api"):
        with pytest.raises(REFUSED) as err:
            if path == "api streamed":
                merge_streamed(a, b, out, progress=False, log=lambda _: None, **dict(extra))
            else:
                merger = PermMerger.from_pretrained([a, b])
                merger.align(matcher="weight", **dict(extra))
                merger.save_pretrained(out, merger.merge(0.5))
        return str(err.value)
    capsys.readouterr()
    flags = ["--streamed"] if path.endswith("--streamed") else []
    assert run_cli("merge", a, b, "--matcher", "weight", *flags, "-q", "-o", out) != 0
    return capsys.readouterr().err


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_a_bad_model_folder_is_refused_in_one_line_leaving_nothing(pair, tmp_path, run_cli, capsys, case, path):
    fault, sharded, named = FOLDER_CASES[case]
    a, b = case_folders(pair, tmp_path, fault, sharded)
    before, out = snapshot(a, b), tmp_path / "out"
    said = run(path, a, b, out, run_cli, capsys)
    assert_one_line(said, named)
    assert left_beside(out) == []
    assert snapshot(a, b) == before
    assert not list(tmp_path.rglob("*.ran"))  # the folder's code never ran


RUN_ALL = (
    "import json, sys; from hf_permerge.cli import main; "
    "print(json.dumps([main(args) for args in json.loads(sys.argv[1])]))"
)


def test_no_folder_code_runs_even_when_yes_is_piped(pair, tmp_path):
    """One process (its stdin all `y`), the command line run in it for each way a folder names code, in memory and
    streamed: every run refused in one line, no code run, nothing written."""
    runs, outs = [], []
    for case in ("config_auto_map", "tokenizer_auto_map"):
        a, b = case_folders(pair, tmp_path / case, FOLDER_CASES[case][0], False)
        for flags in ([], ["--streamed"]):
            outs.append(tmp_path / case / f"out{len(flags)}")
            runs.append(["merge", str(a), str(b), "--matcher", "weight", "-q", "-o", str(outs[-1]), *flags])
    done = subprocess.run(
        [sys.executable, "-c", RUN_ALL, json.dumps(runs)],
        input="y\n" * 100,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert json.loads(done.stdout) == [2, 2, 2, 2], done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 4 and all("names custom code" in line for line in lines), done.stderr
    assert not list(tmp_path.rglob("*.ran")) and all(left_beside(out) == [] for out in outs)


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_a_bad_data_file_is_refused_in_one_line_leaving_nothing(pair, tmp_path, run_cli, capsys, case, streamed):
    write, named = DATA_CASES[case]
    data = write(tmp_path / "data")
    before, out = snapshot(pair["a"], pair["b"], tmp_path / "data"), tmp_path / "out"
    flags = ["--streamed", "--matcher", "activation"] if streamed else []
    capsys.readouterr()
    assert run_cli("merge", pair["a"], pair["b"], *flags, "--dataset", data, "-q", "-o", out) != 0
    assert_one_line(capsys.readouterr().err, named)
    assert left_beside(out) == []
    assert snapshot(pair["a"], pair["b"], tmp_path / "data") == before


def test_different_tokenizers_merge_when_allowed_and_the_card_says_so(pair, tmp_path, run_cli):
    a, b = case_folders(pair, tmp_path, FOLDER_CASES["other_tokenizer"][0], False)
    out = tmp_path / "out"
    assert run_cli("merge", a, b, "--matcher", "weight", "--allow-different-tokenizers", "-q", "-o", out) == 0
    card = (out / "README.md").read_text()
    assert "tokenizers: **they differ** (the tokenizers of a and b differ: 43 of 97 ids" in card
    merger = PermMerger.from_pretrained([a, b], allow_different_tokenizers=True)
    assert merger.merge_settings()["tokenizers_differ"].startswith("the tokenizers of a and b differ")


@pytest.mark.parametrize("command", ["align", "evaluate"])
@pytest.mark.parametrize("case", ["config_auto_map", "missing_tensor", "truncated", "nan_weights", "other_tokenizer"])
def test_align_and_evaluate_refuse_a_bad_folder_the_same_way(pair, tmp_path, run_cli, capsys, case, command):
    fault, sharded, named = FOLDER_CASES[case]
    a, b = case_folders(pair, tmp_path, fault, sharded)
    before, out = snapshot(a, b), tmp_path / "out"
    text = tmp_path / "heldout.txt"
    text.write_text("w1 w2 w3 w4\nw5 w6 w7\n")
    flags = ["--write-aligned", out, "--matcher", "weight"] if command == "align" else ["--dataset", text, "-o", out]
    capsys.readouterr()
    assert run_cli(command, a, b, *flags, "-q") == 2
    assert_one_line(capsys.readouterr().err, named)
    assert left_beside(out) == [] and snapshot(a, b) == before


FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


@pytest.mark.parametrize("streamed", [False, True])
def test_a_full_disk_is_said_in_one_line_and_leaves_nothing(pair, tmp_path, run_cli, capsys, monkeypatch, streamed):
    import errno
    import os

    from safetensors import SafetensorError

    from hf_permerge import shards
    from hf_permerge.models import folders

    if streamed:  # the shards' bytes; not the lock's PID (a few bytes)
        write = os.pwrite

        def full(fd, data, offset):
            if len(data) > 64:
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(fd, data, offset)

        monkeypatch.setattr(shards.os, "pwrite", full)
    else:
        monkeypatch.setattr(folders, "save_file", lambda *a, **k: (_ for _ in ()).throw(SafetensorError(FULL)))
    out = tmp_path / "out"
    flags = ["--streamed"] * streamed
    capsys.readouterr()
    assert run_cli("merge", pair["a"], pair["b"], "--matcher", "weight", *flags, "-q", "-o", out) == 2
    assert_one_line(capsys.readouterr().err, "no space left on the disk")
    assert left_beside(out) == []


@pytest.mark.parametrize(
    "columns, named",
    [
        ({"input_ids": ["1 2 3", "4 5"]}, "input_ids row 0 holds str values"),
        ({"input_ids": [[1, -3, 4], [5, 6]]}, "token id -3 is negative"),
        ({"foo": [1, 2]}, "the data set has no 'input_ids' or 'text' column"),
        ({"text": ["", " "]}, "holds no text"),
    ],
)
def test_the_api_refuses_bad_token_data_in_the_same_words(pair, columns, named):
    import datasets

    merger = PermMerger.from_pretrained([pair["a"], pair["b"]])
    with pytest.raises(ValueError, match=named) as err:
        merger.align(datasets.Dataset.from_dict(columns), matcher="activation")
    assert "\n" not in str(err.value)


def test_config_fields_of_other_legal_forms_are_not_type_errors(pair, tmp_path):
    """Several eos ids (Llama 3) or a field left null are what real checkpoints hold, not a wrong type."""
    from bad_inputs import _edit_json

    from hf_permerge.models.folders import load_config

    b = tmp_path / "b"
    shutil.copytree(pair["b"], b)
    _edit_json(b / "config.json", lambda d: d.update(eos_token_id=[1, 2], pad_token_id=None))
    assert load_config(b).eos_token_id == [1, 2]
