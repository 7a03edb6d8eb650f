"""This process's memory: what the kernel reports (for `chat /stats` and `partinfer memory`), and
handing freed heap back to it, and the allocator setting that keeps a prefill's peak near its steady state."""

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
def _libc_function(name: str):
    """A glibc function (malloc_trim, mallopt), or None where the C library has none (macOS, musl)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 128 << 10  # glibc's own starting value, kept fixed


def fix_mmap_threshold() -> None:
    """Allocations of 128 KiB and more get their own mapping, given back when freed, for the life of
    the process. glibc otherwise raises the threshold to the largest block freed so far (up to 32
    MiB); a prefill's activations (0.1–2 MiB each) then come from the heap, the small tensors made
    between them split its free chunks, and the heap grew by about a layer's transients per layer:
    the peak of a 256-token prompt on the default model was 11–23 MiB over its steady state instead
    of about 4 (docs/benchmarks.md, "Prefill in chunks"). The command line and the memory workers
    call this first thing."""
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_free_heap() -> None:
    """Give the heap pages that freed allocations left behind back to the system. A prefill allocates
    and frees many mid-sized buffers (activations, selection statistics, de-quantized matrices); glibc
    keeps the freed pages resident, so without this a prompt leaves the process megabytes larger."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)
