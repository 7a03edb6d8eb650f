"""Matmul kernels chosen per shape and device.

On CPUs without native bf16 arithmetic (AVX2 only), torch's bf16 GEMM is several times slower than
fp32 for prefill-sized inputs, so with many tokens we upcast the bf16 weight to fp32 for the call:
the copy is cheap next to the GEMM, and the weights stay bf16 in memory. Where the CPU has bf16
instructions (AVX512-BF16, AMX) the upcast loses instead, so there bf16 stays bf16. The
measurements behind both rules and the threshold: docs/design.md §7.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from partinfer.runtime.native import cpu_flags
from partinfer.runtime.quant import dequantize, is_compact

UPCAST_MIN_TOKENS = 32  # below it (e.g. batch-8 decode) the weight upcast costs more than it saves


def cpu_prefers_fp32(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether x @ weight runs faster upcast to fp32; `dtype` stands for the weight's dtype when it
    is compact (then the dtype it would be de-quantized to)."""
    dtype = dtype or weight.dtype
    return (
        x.device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16)
        and x.numel() // x.shape[-1] >= UPCAST_MIN_TOKENS
        and not (dtype == torch.bfloat16 and cpu_has_bf16_math())
    )


def cpu_has_bf16_math() -> bool:
    """The CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), so torch's bf16 GEMM beats the upcast."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with fp32 compute on CPU for many-token half-precision inputs (result in x's dtype).
    The compiled one-token decode (runtime/decode.py) does not come through here. A compact weight
    (uint8 rows, runtime/quant.py) is de-quantized for the call: prefill and the eager path pay one
    de-quantization per matrix, the weights stay compact in memory."""
    compact = is_compact(weight)
    wide = cpu_prefers_fp32(x, weight, x.dtype if compact else None)
    if compact:  # straight to fp32 where the call upcasts anyway
        weight = dequantize(weight, x.shape[-1], torch.float32 if wide else x.dtype)
    if wide:
        b = None if bias is None else bias.float()
        return F.linear(x.float(), weight.float(), b).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward goes through `linear` (same parameters, same state-dict names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
