"""This process's memory: what the kernel reports (for `chat /stats` and `partinfer memory`), and
handing freed heap back to it."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


def proc_status() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process in MiB, from /proc/self/status (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024
    return out


@cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Give the heap pages that freed allocations left behind back to the system. A prefill allocates
    and frees many mid-sized buffers (activations, selection statistics, de-quantized matrices); glibc
    keeps the freed pages resident, so without this a prompt leaves the process megabytes larger."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
