"""Process-wide library settings that must be made before torch, and the MKL inside it, loads.

MKL's "fast memory manager" keeps every thread's GEMM packing buffers for the life of the process,
sized by the largest matrix a prefill multiplied: megabytes that stay resident, a visible share of a
4-bit model's memory. Off, MKL allocates them per call and gives them back (docs/benchmarks.md,
"Memory"). The command line applies these settings first thing; a program that uses the library
directly can call `apply_process_env()` before it imports torch.
"""

from __future__ import annotations

import os

MKL_SETTINGS = {"MKL_DISABLE_FAST_MM": "1"}


def apply_process_env() -> None:
    """Set each setting unless the environment already sets it (a user's own choice wins)."""
    for name, value in MKL_SETTINGS.items():
        os.environ.setdefault(name, value)
