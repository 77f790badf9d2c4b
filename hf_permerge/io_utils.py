"""Atomic writes and output jobs: an output appears whole or not at all, one writer at a time, and nothing a user
made is lost."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask now. `os.umask` reads it only by setting it: for that instant it is the most private
    one (077), so a file another thread makes meanwhile is at worst private, never more open than asked."""
    with _UMASK_LOCK:
        umask = os.umask(0o077)
        os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode `open()` gives a new file now (0644 under the usual umask 022); temporary files start at 0600."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode `mkdir` gives a new folder now (0755 under umask 022); temporary folders start at 0700."""
    return 0o777 & ~current_umask()


def hidden_name(name: str, suffix: str) -> str:
    """`.NAME` + suffix, the name of a temp folder or lock beside NAME, kept under the 255 bytes a file name may have:
    a long NAME is cut and a digest of it added, so two long names still get two names."""
    full = f".{name}{suffix}"
    if len(full.encode()) + 12 <= 255:  # room for tempfile's random part
        return full
    import hashlib

    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f".{name.encode()[:150].decode(errors='ignore')}-{digest}{suffix}"


@contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yield a temp folder beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=hidden_name(target.name, ".tmp-"), dir=target.parent))
    try:
        tmp.chmod(dir_mode())  # mkdtemp's 0700, made the mode of any new folder
        yield tmp
        if target.exists():
            old = target.with_name(hidden_name(target.name, f".old-{os.getpid()}"))
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike):
    """Yields a temporary path beside `path` to write; on success it replaces `path` in one rename, with an
    ordinary file mode (mkstemp makes 0600 files), so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=hidden_name(path.name, ".tmp-"), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Strict JSON (no bare NaN or Infinity, which other readers refuse): a non-finite number is an error naming
    its key, and nothing is written."""
    bad = first_non_finite(data)
    if bad is not None:
        raise ValueError(
            f"not writing {path}: {bad} is not a finite number (NaN or inf); the weights or data it "
            "was measured on hold non-finite values"
        )
    with atomic_file(path) as tmp, tmp.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=False, allow_nan=False)
        f.write("\n")


def first_non_finite(data, where: str = "") -> str | None:
    """The key path (`nets[1].test.loss`) of the first NaN or inf number in a JSON-able value, or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return f"{where or 'the value'} ({data})"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        found = first_non_finite(value, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found:
            return found
    return None


LEFTOVER = re.compile(
    r"\..+\.tmp-[a-z0-9_]{8}|\..+\.old-\d+|\.plots-[a-z0-9_]{8}"
    r"|\.permutations-[a-z0-9_]{8}\.safetensors\.tmp"
)
"""The exact names of our temporary files and folders: `atomic_dir`, `atomic_file`, the report's plots
(tempfile's 8 random characters), and the permutation files' of versions before `atomic_file`."""


def is_leftover(entry: Path) -> bool:
    """A temporary file or folder of ours that a killed run (SIGKILL, power loss) may leave behind."""
    return LEFTOVER.fullmatch(entry.name) is not None


def remove_path(entry: Path) -> None:
    """Delete a file, a link or a whole folder, whichever `entry` is; gone already is fine."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


@dataclass(frozen=True)
class Wording:
    """How a refusal names the way out: the command line's flags or the Python call's arguments."""

    overwrite: str
    resume: str
    elsewhere: str


CLI_WORDING = Wording("--overwrite", "--resume", "choose another --output-dir")
PYTHON_WORDING = Wording("overwrite=True", "resume=True", "save to a new or empty folder")


def check_output_dir(
    path: str | os.PathLike,
    overwrite: bool = False,
    resume: bool = False,
    marker: str | tuple[str, ...] | None = None,
    resumable: bool = False,
    what: str = "an output",
    wording: Wording = CLI_WORDING,
    contents: tuple[str, ...] = (),
) -> Path:
    """Refuse an output folder that exists (unless overwrite/resume) or cannot be written, before any work.

    With `overwrite` or `resume`, only a folder that holds our own output (a `marker` file) is replaced
    or continued; a non-empty folder of anything else is never deleted nor written into. Temporary
    files that a killed run of ours left behind (`is_leftover`) do not count: a folder holding only
    those is cleared. `contents`: the names (glob patterns) such an output consists of; `overwrite`, which
    replaces the whole folder, refuses one that also holds anything else (a user's notes, another command's
    output saved inside it), naming it. `resumable`: the command has --resume, so the refusal suggests it.
    `what` names the output ("a merged model") and `wording` the way out (flags for the CLI, arguments in Python).
    """
    markers = (marker,) if isinstance(marker, str) else tuple(marker or ())
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {path} exists and is not a folder; {wording.elsewhere}")
    entries = list(path.iterdir()) if path.is_dir() else []
    if entries and all(is_leftover(e) for e in entries):
        for e in entries:
            remove_path(e)
    elif entries:
        ours = not markers or any((path / m).exists() for m in markers)
        no_marker = f"no {' or '.join(markers)}"
        if not (overwrite or resume):
            if not ours:
                raise FileExistsError(
                    f"output folder {path} exists and does not hold {what} of hf_permerge ({no_marker}); "
                    f"{wording.elsewhere}"
                )
            raise FileExistsError(
                f"output folder {path} already holds {what}; pass {wording.overwrite} to replace "
                "it"
                + (f" or {wording.resume} to continue an interrupted run" if resumable else "")
                + f", or {wording.elsewhere}"
            )
        if markers and not ours:
            action = f"continue in it with {wording.resume}" if resume else f"delete it even with {wording.overwrite}"
            raise FileExistsError(
                f"output folder {path} is not empty and does not hold {what} of hf_permerge ({no_marker}); "
                f"refusing to {action}. {wording.elsewhere[0].upper()}{wording.elsewhere[1:]}"
            )
        if resume:
            return path
        foreign = sorted(
            e.name
            for e in entries
            if contents and not is_leftover(e) and not any(fnmatch(e.name, pattern) for pattern in contents)
        )
        if foreign:
            listed = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
            raise FileExistsError(
                f"output folder {path} holds {what} of hf_permerge, and also {listed}, which it "
                f"does not consist of; {wording.overwrite} would replace the whole folder, so move "
                f"{'that' if len(foreign) == 1 else 'those'} out of it first, or "
                f"{wording.elsewhere}"
            )
    parent = path if path.is_dir() else next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise NotADirectoryError(f"output folder {path} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"output folder {path} cannot be written (no write permission on {parent})")
    return path


def missing_folder_error(path: Path, hub: str = "") -> FileNotFoundError:
    """A local path that does not exist, with the folders that do exist where it points."""
    parent = next((p for p in path.parents if p.is_dir()), Path("."))
    there = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    listing = ", ".join(there[:8]) + (", ..." if len(there) > 8 else "") if there else "no folders"
    return FileNotFoundError(f"there is no folder {path} ({parent} holds: {listing}){hub}")


def only_a_local_path(text: str) -> bool:
    """Whether `text` can only name a local path: no Hub repo id starts with `.`, `/` or `~`, ends with `/`,
    or has more than one `/`."""
    return text.startswith((".", "/", "~")) or text.endswith("/") or len(Path(text).parts) > 2


_JOBS = threading.local()


def _held() -> list[Path]:
    """The folders this thread's jobs are writing: their targets (locked) and staging folders."""
    if not hasattr(_JOBS, "folders"):
        _JOBS.folders = []
    return _JOBS.folders


def written_by_this_thread(path: str | os.PathLike) -> bool:
    """Whether `path` is, or lies inside, a folder that a job of this thread holds (`folder_lock`, `output_job`'s
    staging folder): a library call nested in a command's job writes there as part of that job."""
    path = Path(path).resolve()
    return any(path == folder or folder in path.parents for folder in _held())


@contextmanager
def _holding(folder: Path):
    folders, folder = _held(), Path(folder).resolve()
    folders.append(folder)
    try:
        yield
    finally:
        folders.remove(folder)


@contextmanager
def folder_lock(target: str | os.PathLike):
    """One writer per output folder: an exclusive `flock` on `.NAME.lock` beside `target` for the whole job, the
    file holding the writer's PID. A second writer is refused at once, naming that PID. The kernel drops the lock
    of a killed process, so a stale file is simply taken over (its PID rewritten). Plain `fcntl` rather than
    `filelock`, whose contenders truncate the file and so would erase the holder's PID."""
    import fcntl

    target = Path(target)
    created = [p for p in target.parents if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / hidden_name(target.name, ".lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FileExistsError(
                f"output folder {target} is being written by another hf-permerge process (PID "
                f"{holder}); wait for it to finish, or choose another --output-dir"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its previous holder removed as we opened it
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    remove_stale_leftovers(target)
    try:
        with _holding(target):
            yield path
    finally:
        Path(path).unlink(missing_ok=True)  # while still held: a waiting writer then takes a new file
        os.close(fd)
        for folder in created if not target.exists() else ():  # the parents made for a job that left nothing
            try:
                folder.rmdir()
            except OSError:
                break


def remove_stale_leftovers(target: Path) -> None:
    """Remove the temp folders and files a killed writer of `target` left beside it (`.NAME.tmp-*`, `.NAME.old-*`):
    called by the lock's new holder, so no live writer owns them (a killed large merge would else leak a model's
    size of disk per kill)."""
    prefixes = (hidden_name(target.name, ".tmp-"), hidden_name(target.name, ".old-"))
    for entry in target.parent.iterdir() if target.parent.is_dir() else ():
        if entry.name.startswith(prefixes) and is_leftover(entry):
            remove_path(entry)


def check_outside_inputs(output: str | os.PathLike, inputs, overwrite: bool = False, wording=None) -> None:
    """Refuse an output folder that is one of the input folders or lies inside one (a merge written into a model it
    reads), and, with `overwrite`, one that holds an input (replacing it would delete that input)."""
    wording = wording or CLI_WORDING
    out = Path(output).expanduser().resolve()
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            continue  # a Hub id
        path = path.resolve()
        if out == path or path in out.parents:
            where = "is" if out == path else "lies inside"
            raise ValueError(
                f"output folder {output} {where} the input {item}, which it must not write into; "
                f"{wording.elsewhere} outside the models' folders"
            )
        if overwrite and out in path.parents:
            raise ValueError(
                f"output folder {output} holds the input {item}, which {wording.overwrite} would "
                f"delete; {wording.elsewhere} outside the models' folders"
            )


OUTCOME = "hf_permerge_outcome"
"""The attribute an exception leaving `output_job` carries: what became of the output folder, for the message."""


@contextmanager
def output_job(target: str | os.PathLike, replace: bool = False, into: bool = False, keep=None):
    """Run a job that writes the folder `target`, so that a failure (any exception, Ctrl-C, SIGTERM) leaves
    nothing it made and loses nothing that was there. Yields the folder to write.

    replace: `target` holds an output that the job replaces (--overwrite): the job writes into a new folder beside
    it, swapped in when it succeeds (`into`: entry by entry, for an output that shares its folder, as `evaluate`'s
    in a run folder); on failure the old output is exactly as it was. Otherwise the job writes into `target`
    itself (so an interrupted training can be resumed there); on failure what it made is removed, unless
    `keep(target)` says (a message) that what is there is worth keeping, such as a training's resume state.
    The exception leaving carries what became of the folder (`OUTCOME`)."""
    target = Path(target)
    if replace and target.is_dir():
        stage = Path(tempfile.mkdtemp(prefix=hidden_name(target.name, ".tmp-"), dir=target.parent))
        stage.chmod(dir_mode())
        try:
            with _holding(stage):
                yield stage
        except BaseException as err:
            shutil.rmtree(stage, ignore_errors=True)
            setattr(err, OUTCOME, f"{target} is as it was (the new output was not swapped in)")
            raise
        _swap_in(stage, target, into)
        return
    existed = target.exists()
    before = {e.name for e in target.iterdir()} if target.is_dir() else set()
    try:
        yield target
    except BaseException as err:
        kept = keep(target) if keep is not None and target.is_dir() else None
        if kept:
            setattr(err, OUTCOME, kept)
        else:
            made = [e for e in target.iterdir() if e.name not in before] if target.is_dir() else []
            created = not existed and (target.exists() or target.is_symlink())
            if created:
                remove_path(target)
            for entry in made if existed else ():
                remove_path(entry)
            setattr(err, OUTCOME, f"nothing it made was left in {target}" if made or created else "")
        raise


def _swap_in(stage: Path, target: Path, into: bool) -> None:
    """Put the finished `stage` in place of `target`: the whole folder, or (`into`) each of its entries."""
    pairs = [(e, target / e.name) for e in stage.iterdir()] if into else [(stage, target)]
    for new, old in pairs:
        if old.exists() or old.is_symlink():
            aside = old.with_name(hidden_name(old.name, f".old-{os.getpid()}"))
            os.replace(old, aside)
            os.replace(new, old)
            remove_path(aside)
        else:
            os.replace(new, old)
    if into:
        shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def folder_job(
    target: str | os.PathLike, check, overwrite: bool = False, resume: bool = False, into: bool = False, keep=None
):
    """Write the output folder `target` as one job, the same for a command and a Python call: locked for the whole
    job (`folder_lock`: one writer per folder), `check()` (the output's refusals) before the lock and again under it
    (two writers cannot both find it free), an output that `overwrite` replaces written beside it and swapped in on
    success, and on any failure nothing it made left and nothing that was there lost (`output_job`, with `into` and
    `keep`). Yields (the folder to write, whether the caller should still replace what is there itself).

    A call nested in a job of this thread on `target` or a folder above it (a command's, or `run`'s around its
    training) writes as part of that job; so do the processes of `accelerate launch`, which share the folder: both
    get `target` and `overwrite` as they are, checked, with the caller's own replacing. A `target` that is a symbolic
    link is written where it points (said once), so the link stays and shows the new output."""
    target = Path(target)
    if target.is_symlink():
        real = target.resolve()
        logging.getLogger(__name__).warning("%s is a link to %s: writing the output there, the link kept", target, real)
        target = real
    if written_by_this_thread(target) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        check()
        yield target, overwrite
        return
    check()  # a refusal before anything is made (the lock file, missing parents)
    with folder_lock(target):
        check()
        replace = overwrite and not resume and target.is_dir() and any(target.iterdir())
        with output_job(target, replace, into, keep) as out:
            yield out, overwrite and not replace
