"""The optional compiled CPU kernels (runtime/csrc/partinfer_cpu.cpp and its headers): bf16 and compact 4/8-bit GEMV on AVX2.

Built once with torch's C++ extension tooling (g++ and ninja) into
`$PARTINFER_HOME/build/<torch version>/`, then loaded from there. The build holds an `flock` (released
by the kernel if the builder dies) and runs in a child process group that dies with its parent, so
an interrupted first run never leaves a lock that later runs wait on. Where they cannot be built (no
compiler, not x86 with AVX2+FMA) or `PARTINFER_NATIVE=0` is set, `cpu_kernels()` is False and every
caller keeps the stock PyTorch path, which gives the same results at lower speed.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from partinfer.common.paths import cache_home

SOURCE = Path(__file__).parent / "csrc" / "partinfer_cpu.cpp"  # one translation unit, each concern a header
HEADERS = tuple(sorted((Path(__file__).parent / "csrc").glob("*.h")))
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The x86 feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(flags.partition(":")[2].split())


def _cpu_has_avx2_fma() -> bool:
    return {"avx2", "fma", "f16c"} <= cpu_flags()


BUILD_LOCK_TIMEOUT_S = 300.0  # waiting for another process's build
BUILD_TIMEOUT_S = 600.0  # our own build


def build_dir() -> Path:
    return cache_home() / "build" / torch.__version__.replace("+", "_")


def _source_stamp() -> str:
    """Identifies a finished build of this source with this torch: written last, checked before loading."""
    sources = b"".join(path.read_bytes() for path in (SOURCE, *HEADERS))
    return hashlib.sha256(sources + torch.__version__.encode()).hexdigest()


def _built(build: Path) -> bool:
    stamp = build / "partinfer_cpu.ready"
    return stamp.is_file() and stamp.read_text() == _source_stamp() and (build / "partinfer_cpu.so").is_file()


@functools.cache
def cpu_kernels() -> bool:
    """True when torch.ops.partinfer_cpu (gemv, gemv_t, rms_norm, argmax, model_decode) is loaded (building them on first use)."""
    if os.environ.get("PARTINFER_NATIVE", "1") == "0" or not _cpu_has_avx2_fma():
        return False
    build = build_dir()
    try:
        if not _built(build):
            _build_once(build)
        torch.ops.load_library(str(build / "partinfer_cpu.so"))
    except (OSError, RuntimeError, TimeoutError) as e:  # no compiler, failed build, a lock held too long
        print(f"partinfer: CPU kernels unavailable ({e}); using stock PyTorch matmuls", file=sys.stderr)
        return False
    return True


def _build_once(build: Path) -> None:
    """Build under an exclusive `flock`, which the kernel releases when its holder dies (no stale lock).

    The compile runs in a child process group that dies with us (see `_compile_child`), so a killed
    first run leaves neither a hung lock nor a compiler writing into the build directory."""
    build.mkdir(parents=True, exist_ok=True)
    with open(build / "partinfer-build.lock", "w") as lock:
        deadline = time.monotonic() + BUILD_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has held {lock.name} for {BUILD_LOCK_TIMEOUT_S:.0f} s") from None
                time.sleep(0.2)
        if _built(build):  # another process finished it while we waited
            return
        (build / "lock").unlink(missing_ok=True)  # torch's own lock file, left by a killed build: nobody holds it now
        (build / "partinfer_cpu.ready").unlink(missing_ok=True)
        print("building partinfer's CPU kernels once (~30 s) ...", file=sys.stderr)
        child = subprocess.Popen([sys.executable, "-m", "partinfer.runtime.native", "--compile"], start_new_session=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = child.communicate(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the build took more than {BUILD_TIMEOUT_S:.0f} s") from None
        finally:  # the whole group: ninja and the compilers too (also on Ctrl-C)
            if child.poll() is None:
                child.terminate()  # the child ends its group (see _end_build_group)
                try:
                    child.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
        if child.returncode != 0:
            last = (out or "").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"the build failed: {last[0][:200]}")
        (build / "partinfer_cpu.ready").write_text(_source_stamp())


def _end_build_group(*_) -> None:
    """SIGTERM first: ninja runs each compiler in a process group of its own and passes SIGTERM on to them;
    then SIGKILL for whatever is left of our group, ourselves included."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(os.getpgrp(), signal.SIGTERM)
    time.sleep(0.5)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _compile_child() -> None:
    """The build process: leader of its own process group, it takes that group (ninja, g++) down when its parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, _end_build_group)
    if os.getppid() == 1:  # the parent died before the signal was armed
        _end_build_group()
    from torch.utils.cpp_extension import load

    # -fopenmp: at::parallel_for is inlined from ATen's OpenMP header; without it the kernels run on one thread.
    load(name="partinfer_cpu", sources=[str(SOURCE)], extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
         extra_ldflags=["-fopenmp"], build_directory=str(build_dir()), is_python_module=False, verbose=False)


def gemv(weight: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """weight [N, K] bf16, x [K] fp32 or bf16 -> [R] in x's dtype: weight[rows] @ x (all rows when `rows`
    is None), accumulated in fp32."""
    return torch.ops.partinfer_cpu.gemv(weight, x, rows)


def gemv_t(weight: torch.Tensor, a: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """weight [N, K] bf16, a [R] fp32 -> [K] fp32: a @ weight[rows] (all rows when `rows` is None)."""
    return torch.ops.partinfer_cpu.gemv_t(weight, a, rows)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm of contiguous bf16 rows in one op (fp32 math, rounded as transformers rounds)."""
    return torch.ops.partinfer_cpu.rms_norm(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rope on bf16 heads x [B, H, T, hd] in one op, rounded as `x * cos + rotate_half(x) * sin` in bf16 rounds."""
    return torch.ops.partinfer_cpu.rope(x, cos, sin)


def decode_plan(dim: int, n_heads: int, n_kv_heads: int, head_dim: int, eps: float, inv_freq: torch.Tensor,
                layers: dict[str, list]) -> object:
    """A `DecodePlan` (a C++ object, torch.classes.partinfer_cpu.DecodePlan): every layer's weights for
    the one-op decode, checked once here. `layers` holds one list per field, one entry per layer: norm1,
    qkv, o, norm2 (tensors), then the FFN record (kind, w1, w2, w3, n_base, n_active, scale, down_table,
    down_block: the fields of runtime/decode_contract.py's FfnWeights) and comp_in, comp_out (empty
    tensors for none), then k, v (q, k and v apart when their formats differ: qkv holds q; empty: fused)
    and qkv_bias (fp32, empty: none); inv_freq [hd/2] fp32 (cos/sin are computed inside, as the eager model computes them)."""
    order = ("norm1", "qkv", "o", "norm2", "kind", "w1", "w2", "w3", "n_base", "n_active", "scale", "down_table",
             "down_block", "comp_in", "comp_out", "k", "v", "qkv_bias")
    return torch.classes.partinfer_cpu.DecodePlan(dim, n_heads, n_kv_heads, head_dim, eps, inv_freq,
                                                  *(layers[name] for name in order))


def model_decode(x: torch.Tensor, plan: object, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int) -> torch.Tensor:
    """One token at rope position `pos` through every pre-norm layer (RMSNorm, attention, RMSNorm, FFN,
    residuals) with the weights of `plan` (`decode_plan`): x [D] bf16 -> [D] bf16; k/v_cache
    [L, Hkv, S, hd] (slot `pos` is written)."""
    return torch.ops.partinfer_cpu.model_decode(x, plan, k_cache, v_cache, pos)


def kernel_block_bytes(kernel: str) -> int:
    """Bytes per block of the compact format whose compiled kernels are `kernel` (as the C++ has them)."""
    return torch.ops.partinfer_cpu.kernel_block_bytes(kernel)


def dequantize(weight: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Compact rows [..., row_bytes] uint8 -> [..., cols] fp32 or bf16, as runtime.quant.dequantize computes them."""
    return torch.ops.partinfer_cpu.dequantize(weight, cols, dtype)


def dequantize_k(weight: torch.Tensor, cols: int, kernel: str, dtype: torch.dtype) -> torch.Tensor:
    """K-quant rows ("q4_k" | "q6_k") [..., row_bytes] uint8 -> [..., cols] fp32 or bf16, equal to the format's reference."""
    return torch.ops.partinfer_cpu.dequantize_k(weight, cols, kernel, dtype)


def dequantize_columns_k(codes: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, kernel: str,
                         dtype: torch.dtype) -> torch.Tensor:
    """K-quant down columns of the neurons `ids` -> [k, d], equal to runtime.quant's reference."""
    return torch.ops.partinfer_cpu.dequantize_columns_k(codes, table, ids, kernel, dtype)


def gemv_k(weight: torch.Tensor, x: torch.Tensor, kernel: str, rows: torch.Tensor | None = None) -> torch.Tensor:
    """K-quant rows ("q4_k" | "q6_k") [N, row_bytes] uint8, x [T, cols] fp32 -> [T, R or N] fp32: weight[rows] @ x[t]
    with x quantized per 256 to 8 bits (llama.cpp's Q8_K), as `quantize_activation_k` computes it."""
    return torch.ops.partinfer_cpu.gemv_k(weight, x, kernel, rows)


def down_k(codes: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, a: torch.Tensor, kernel: str,
           rows: torch.Tensor | None = None) -> torch.Tensor:
    """K-quant down columns of the neurons `ids` [j], a [T, j] fp32 -> [T, d] fp32: sum_i a[t, i] * column(ids[i]),
    entry i's codes being codes[rows[i]] (codes[i] when `rows` is None): chosen neurons read in place."""
    return torch.ops.partinfer_cpu.down_k(codes, table, ids, a, kernel, rows)


def dequantize_columns(codes: torch.Tensor, table: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Down columns -> [k, d] fp32 or bf16, as runtime.quant.dequantize_columns computes them."""
    return torch.ops.partinfer_cpu.dequantize_columns(codes, table, blocks, dtype)


def down_columns(codes: torch.Tensor, table: torch.Tensor, blocks: torch.Tensor, a: torch.Tensor,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """a [R] fp32 -> [d] fp32: sum_r a[r] * column(rows[r]), the compiled decode's down kernel on one thread."""
    return torch.ops.partinfer_cpu.down_columns(codes, table, blocks, a, rows)


def rows_gemm(weight: torch.Tensor, x: torch.Tensor, kernel: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """4-bit rows weight [N, row_bytes] (`kernel` "q4_1" or "q4_k"; contiguous, or 2-D with a row stride),
    x [M, K] fp32 or bf16, bias [N] fp32 or None -> [M, N] in x's dtype: a prompt's product in integers (x
    quantized to 8 bits per 32, as the GEMV quantizes it), on AVX2 or AVX-512 VNNI."""
    return torch.ops.partinfer_cpu.rows_gemm(weight, x, kernel, bias)


def q4_1_columns_gemm(codes: torch.Tensor, table: torch.Tensor, blocks: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Q4_1 down columns (codes [n, d / 2], table, blocks [n] int64), a [M, n] fp32 or bf16 -> [M, d] in a's
    dtype: a prompt's down product in integers (a quantized to 8 bits per block of neurons)."""
    return torch.ops.partinfer_cpu.q4_1_columns_gemm(codes, table, blocks, a)


def prompt_gemm_available() -> bool:
    """Whether this process runs `rows_gemm` and `q4_1_columns_gemm`: wherever the compiled kernels are
    built (an AVX2 form, and an AVX-512 VNNI one chosen by `compact_kernel_path`'s rule)."""
    return cpu_kernels()


def compact_kernel_path() -> str:
    """Which compact-weight kernels (Q4_1/Q8_0 rows and columns, Q4_K/Q6_K products) this process uses:
    "avx512-vnni", or "avx2" (also with PARTINFER_VNNI=0)."""
    return torch.ops.partinfer_cpu.compact_kernel_path()


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] contiguous fp32/bf16 CPU -> [B] int64, as torch.argmax(x, -1) (first maximum, NaN first)."""
    return torch.ops.partinfer_cpu.argmax(x)


if __name__ == "__main__":
    if sys.argv[1:] == ["--compile"]:
        _compile_child()
    else:
        print("CPU kernels:", "ready" if cpu_kernels() else "unavailable (stock PyTorch path)")
