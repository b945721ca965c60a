"""Process memory helpers shared by the benchmarks (bench/train.py, bench/score.py)."""

from __future__ import annotations

import ctypes
import gc
import os

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """The resident set size of this process, from /proc (torch's CPU allocations included)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def trim() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next RSS baseline is low."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
