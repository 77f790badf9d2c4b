"""The `hf-permerge` command line: config files plus `--set section.key=value` overrides.

`parser` builds the arguments (nothing heavy imported, so `--help` answers at once), `options` reads them,
`commands` runs each subcommand as a job of `jobs` on its output folder; `main` here turns errors into one line
and exit codes.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
import threading

from . import commands
from .options import command_line
from .parser import build_parser

__all__ = ["build_parser", "command_line", "main"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is: it unwinds like Ctrl-C (temporary folders are removed on the way
    out, the same message), and the command exits 143 as a terminated process does."""


def _exit_on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    previous = signal.getsignal(signal.SIGTERM)
    ours = threading.current_thread() is threading.main_thread() and previous is signal.SIG_DFL
    if ours:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _run(args)
    finally:
        if ours:
            signal.signal(signal.SIGTERM, previous)


def one_line(err: BaseException, message: str) -> str:
    """An error's message on one line; a full disk said as such, whatever raised it."""
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in message:
        where = getattr(err, "filename", None)
        return (
            f"no space left on the disk{f' of {where}' if where else ''} while writing; free space there or "
            "choose an --output-dir on another disk"
        )
    return " ".join(message.split())


def _run(args) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from ..allocator import reuse_freed_memory

    reuse_freed_memory()  # a command's large CPU tensors reuse freed memory (allocator.py: 2x on CNN passes)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        return commands.COMMANDS[args.command](args)
    except (ValueError, OSError, RuntimeError, MemoryError) as err:
        if args.verbose:  # -v: the whole traceback, for a bug report
            import traceback

            traceback.print_exc()
        from ..hub import cli_message
        from ..io_utils import OUTCOME

        outcome = getattr(err, OUTCOME, "")
        print(
            f"hf-permerge {args.command}: error: {one_line(err, cli_message(err))}"
            + (f" ({outcome})" if outcome else ""),
            file=sys.stderr,
        )
        return 2
    except Exception as err:  # noqa: BLE001 - a bug or an error of a library we did not foresee: still one line
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(
            f"hf-permerge {args.command}: error: {type(err).__name__}: {one_line(err, str(err))} (unexpected: "
            "run again with -v for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as err:
        from ..io_utils import OUTCOME

        resume = "; --resume continues it from the last epoch end it reached"
        again = {
            "train": resume,
            "run": resume,
            "sweep": "; the same command continues it (finished cells are kept)",
        }.get(args.command, "")
        how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        outcome = getattr(err, OUTCOME, None)  # set by the job: what became of the output folder
        print(
            f"hf-permerge {args.command}: {how}; " + (outcome or f"nothing half-written was left{again}"),
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM if isinstance(err, Terminated) else 130
