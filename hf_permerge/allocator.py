"""Host-memory reuse for CPU work: one process-wide glibc setting, applied by our command line only.

A CNN's activations or an MLP's gradients are tens of MB per step; glibc serves blocks that large with fresh
pages and returns them on free, so every step pays a page fault per 4 KiB page. Keeping freed blocks for reuse
removes those faults (BENCHMARKS.md, "Host memory"); results are unchanged. A library must not change its host
process unasked, so `import hf_permerge` leaves malloc alone; `hf-permerge`, `examples/sweep.py` and
`examples/train_pair.py` call `reuse_freed_memory()`. Opt out with HF_PERMERGE_MALLOC=default; glibc's own
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ variables, when set, win.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
LIMIT = 1 << 30
"""Blocks up to 1 GiB come from the reused heap, and up to 1 GiB of freed memory stays mapped for reuse."""


def reuse_freed_memory(limit: int = LIMIT) -> bool:
    """Keep large freed blocks for reuse (glibc on Linux); True when the setting took effect."""
    if os.environ.get("HF_PERMERGE_MALLOC", "").lower() == "default":
        return False
    if sys.platform != "linux" or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = libc.mallopt(_M_MMAP_THRESHOLD, limit) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, limit) == 1
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    logger.debug("malloc: large freed blocks kept for reuse (up to %d bytes): %s", limit, applied)
    return applied
