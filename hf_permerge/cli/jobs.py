"""A command that writes a folder runs as a job: one writer per folder, and a failure leaves nothing it made and
loses nothing that was there (what `train`, `run` and `sweep` keep for `--resume` is said here)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def job(args, check, keep=None, into: bool = False):
    """Run a command's job on its --output-dir: locked for the whole job (one writer per folder), checked under
    the lock (so two writers cannot both find it free), written beside an existing output that --overwrite
    replaces and swapped in at the end, and on any failure leaving nothing it made (`io_utils.output_job`).
    Yields (the folder to write, whether the library should overwrite there). Under several processes
    (`accelerate launch`), which share the folder, the library's own checks and overwrite apply instead."""
    from pathlib import Path

    from ..io_utils import folder_lock, output_job

    target = Path(args.output_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield target, args.overwrite
        return
    check()  # a refusal before anything is made (the lock file, missing parents)
    with folder_lock(target):
        check()  # again under the lock: two writers cannot both find the folder free
        replace = args.overwrite and not getattr(args, "resume", False) and target.is_dir() and any(target.iterdir())
        with output_job(target, replace, into, keep) as out:
            yield out, args.overwrite and not replace


def resumable_pair(pair) -> bool:
    """Whether a pair folder holds what `--resume` continues from: an epoch's resume point, or finished nets."""
    return any(pair.glob("net_*/resume-step-*")) or any(pair.glob("net_*/final"))


def keep_pair(args):
    """What a failed `train` keeps: everything when resuming, the resume state of a new pair when it has one."""

    def keep(folder):
        if args.resume or resumable_pair(folder):
            return f"kept its resume state in {folder}: --resume continues it"
        return None

    return keep


def keep_run(args):
    """What a failed `run` keeps: its pair's resume state (the rest is made again by --resume), if any."""

    def keep(folder):
        if args.resume:
            return f"kept what was done in {folder}: --resume continues it"
        if not (resumable_pair(folder / "pair") or (folder / "pair" / "pair.json").exists()):
            return None
        from ..io_utils import _remove

        for entry in folder.iterdir():
            if entry.name != "pair":
                _remove(entry)
        return f"kept the pair's resume state in {folder / 'pair'}: --resume continues the run"

    return keep
