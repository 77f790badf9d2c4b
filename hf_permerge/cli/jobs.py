"""A command that writes a folder runs as a job on its --output-dir (`io_utils.folder_job`, as the library's own
writers do): one writer per folder, and a failure leaves nothing it made and loses nothing that was there. What
`train`, `run` and `sweep` keep for a second try is said by the library's `keep_*`, in the command line's words."""

from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def job(args, check, keep=None, into: bool = False):
    """Run a command's job on its --output-dir, --overwrite and --resume (`io_utils.folder_job`). Yields (the folder
    to write, whether the library should overwrite there)."""
    from ..io_utils import folder_job

    with folder_job(Path(args.output_dir), check, args.overwrite, getattr(args, "resume", False), into, keep) as job:
        yield job
