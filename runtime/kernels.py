"""Matmul kernels chosen per shape and device, measured on the target CPU.

On CPUs without native bf16 arithmetic (AVX2 only, like the first development machine), torch's
bf16 GEMM is ~6x slower than fp32 for prefill-sized inputs (76 vs 447 tokens/s on the default
model), so with many tokens we upcast the bf16 weight to fp32 for the call: the copy is cheap next
to the GEMM, and the weights stay bf16 in memory. Where the CPU has bf16 instructions (AVX512-BF16,
AMX) the upcast loses instead: on a Zen 4 machine one [3072, 576] layer took 1.1 ms in bf16 against
3.4 ms upcast for 64 tokens (8.6 vs 19.9 ms for 512), so there bf16 stays bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.native import cpu_flags, cpu_kernels, gemv

UPCAST_MIN_TOKENS = 32  # measured: with 8 tokens (batch-8 decode) the weight upcast costs more than it saves


def cpu_prefers_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and weight.dtype in (torch.bfloat16, torch.float16)
        and x.numel() // x.shape[-1] >= UPCAST_MIN_TOKENS
        and not (weight.dtype == torch.bfloat16 and cpu_has_bf16_math())
    )


def cpu_has_bf16_math() -> bool:
    """The CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), so torch's bf16 GEMM beats the upcast."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def uses_native_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One bf16 row on the CPU with the compiled kernels loaded."""
    return (
        x.device.type == "cpu" and weight.dtype == torch.bfloat16 and x.numel() == x.shape[-1]
        and weight.is_contiguous() and cpu_kernels()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; fp32 compute on CPU for many-token half-precision inputs, the compiled GEMV for one
    bf16 token (result in x's dtype)."""
    if uses_native_gemv(x, weight):
        y = gemv(weight, x.reshape(-1))  # [N], x's dtype
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], -1)
    if cpu_prefers_fp32(x, weight):
        b = None if bias is None else bias.float()
        return F.linear(x.float(), weight.float(), b).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward goes through `linear` (same parameters, same state-dict names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
