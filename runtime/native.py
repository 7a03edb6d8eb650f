"""The optional compiled CPU kernels (runtime/csrc/cpu_gemv.cpp): bf16 GEMV at memory speed on AVX2.

Built once with torch's C++ extension tooling (g++ and ninja, ~30 s) into
`$PARTINFER_HOME/build/<torch version>/`, then loaded from there. Where they cannot be built (no
compiler, not x86 with AVX2+FMA) or `PARTINFER_NATIVE=0` is set, `cpu_kernels()` is False and every
caller keeps the stock PyTorch path, which gives the same results at lower speed.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_gemv.cpp"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The x86 feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(flags.partition(":")[2].split())


def _cpu_has_avx2_fma() -> bool:
    return {"avx2", "fma"} <= cpu_flags()


@functools.cache
def cpu_kernels() -> bool:
    """True when torch.ops.partinfer_cpu (gemv, gemv_t, rms_norm, argmax, attention_decode, model_decode) is loaded (building them on first use)."""
    if os.environ.get("PARTINFER_NATIVE", "1") == "0" or not _cpu_has_avx2_fma():
        return False
    from torch.utils.cpp_extension import load

    from runtime.prepare import cache_home

    build = cache_home() / "build" / torch.__version__.replace("+", "_")
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob("*.so")):
        print("building partinfer's CPU kernels once (~30 s) ...", file=sys.stderr)
    try:
        # -fopenmp: at::parallel_for is inlined from ATen's OpenMP header; without it the kernels run on one thread.
        load(name="partinfer_cpu", sources=[str(SOURCE)], extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
             extra_ldflags=["-fopenmp"], build_directory=str(build), is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, failed build: the stock path still works
        print(f"partinfer: CPU kernels unavailable ({type(e).__name__}); using stock PyTorch matmuls", file=sys.stderr)
        return False
    return True


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


def attention_decode(
    x: torch.Tensor, qkv_w: torch.Tensor, o_w: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, pos: int, n_heads: int, n_kv_heads: int,
) -> torch.Tensor:
    """One token through Llama attention: x [D] bf16 -> [D] bf16; writes slot `pos` of k/v_cache [Hkv, S, hd]."""
    return torch.ops.partinfer_cpu.attention_decode(x, qkv_w, o_w, k_cache, v_cache, cos, sin, pos, n_heads, n_kv_heads)


def model_decode(
    x: torch.Tensor, norm1: list[torch.Tensor], qkv: list[torch.Tensor], o: list[torch.Tensor], k_cache: torch.Tensor,
    v_cache: torch.Tensor, inv_freq: torch.Tensor, pos: int, n_heads: int, n_kv_heads: int,
    norm2: list[torch.Tensor], kind: list[int], w1: list[torch.Tensor], w2: list[torch.Tensor], w3: list[torch.Tensor],
    n_base: list[int], n_active: list[int], score_scale: list[torch.Tensor], eps: float,
) -> torch.Tensor:
    """One token at rope position `pos` through every pre-norm layer (RMSNorm, attention, RMSNorm, FFN,
    residuals): x [D] bf16 -> [D] bf16; each layer's FFN as (kind, w1, w2, w3, n_base, n_active,
    score_scale), see `runtime.model.FfnSpec`; k/v_cache [L, Hkv, S, hd] (slot `pos` is written);
    inv_freq [hd/2] fp32 (cos/sin are computed inside, as the eager model computes them)."""
    return torch.ops.partinfer_cpu.model_decode(x, norm1, qkv, o, k_cache, v_cache, inv_freq, pos, n_heads, n_kv_heads,
                                                norm2, kind, w1, w2, w3, n_base, n_active, score_scale, eps)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] contiguous fp32/bf16 CPU -> [B] int64, as torch.argmax(x, -1) (first maximum, NaN first)."""
    return torch.ops.partinfer_cpu.argmax(x)


if __name__ == "__main__":
    print("CPU kernels:", "ready" if cpu_kernels() else "unavailable (stock PyTorch path)")
