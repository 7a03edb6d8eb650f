"""Compact weight formats: ggml's Q4_1 and Q8_0 blocks, one matrix row = one run of whole blocks.

A compact matrix is a uint8 tensor [N, K / 32 * block_bytes]: row r holds the blocks of the r-th
output row along the input dimension K, so a row (a neuron's gate, up or down row, an attention
output row, a token's embedding) stays one contiguous, separately readable run, and partial
loading of γ stays a positioned read of a hot-first prefix.

  Q4_1  20 bytes per 32 weights: fp16 scale d, fp16 minimum m, 16 bytes of 4-bit codes q
        (byte j holds weight j in its low nibble and weight j + 16 in its high one); w = d·q + m.
  Q8_0  34 bytes per 32 weights: fp16 scale d, 32 int8 codes q; w = d·q.

The byte layout is ggml's, so the embedded model's GGUF blocks are kept bit for bit. Which format a
row uses follows from its byte count and K (20 or 34 bytes per 32 weights), so a kernel needs no
other tag. `WeightFormat` names the choice a packed checkpoint makes for each kind of matrix. FFN
down matrices are kept per neuron as columns, codes plus a table of block scales ("Down columns",
below).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from partinfer.common.errors import PartinferError
from partinfer.runtime.native import cpu_kernels
from partinfer.runtime.native import dequantize as native_dequantize
from partinfer.runtime.native import dequantize_columns as native_dequantize_columns

BLOCK = 32
Q4_1_BYTES = 20
Q8_0_BYTES = 34


class Quant(Enum):
    Q4_1 = Q4_1_BYTES
    Q8_0 = Q8_0_BYTES

    @property
    def block_bytes(self) -> int:
        return self.value

    def row_bytes(self, k: int) -> int:
        return k // BLOCK * self.value

    def code_bytes(self, k: int) -> int:
        """Bytes of `k` codes without their scales: one neuron's down column (see `columns_from_rows`)."""
        return k // 2 if self is Quant.Q4_1 else k

    @property
    def table_width(self) -> int:
        """fp16 values per block in a column table: (d, m) for Q4_1, d for Q8_0."""
        return 2 if self is Quant.Q4_1 else 1


@dataclass(frozen=True)
class WeightFormat:
    """How a packed checkpoint stores each kind of matrix: a Quant, or None for the source dtype (bf16).

    `q4`: attention, FFN gate/up and down in Q4_1 (the embedded GGUF's own blocks, down as columns:
    `columns_from_rows`), the embedding in Q8_0 (the GGUF's own type for it). `int8`: Q8_0
    everywhere. `bf16`: no compaction."""

    name: str
    attention: Quant | None
    gate_up: Quant | None
    down: Quant | None
    embedding: Quant | None

    @property
    def compact(self) -> bool:
        return self.gate_up is not None


WEIGHT_FORMATS = {
    "bf16": WeightFormat("bf16", None, None, None, None),
    "q4": WeightFormat("q4", Quant.Q4_1, Quant.Q4_1, Quant.Q4_1, Quant.Q8_0),
    "int8": WeightFormat("int8", Quant.Q8_0, Quant.Q8_0, Quant.Q8_0, Quant.Q8_0),
}


def weight_format(name: str) -> WeightFormat:
    if name not in WEIGHT_FORMATS:
        raise PartinferError(f"unknown weight format {name!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    return WEIGHT_FORMATS[name]


def quant_of(row_bytes: int, k: int) -> Quant:
    """The format of compact rows of `row_bytes` bytes holding `k` weights."""
    if k % BLOCK or k == 0:
        raise PartinferError(f"compact weights need rows of a multiple of {BLOCK} weights, not {k}")
    per_block = row_bytes * BLOCK // k
    if per_block * k != row_bytes * BLOCK or per_block not in (Q4_1_BYTES, Q8_0_BYTES):
        raise PartinferError(f"compact rows of {row_bytes} bytes do not hold {k} weights in Q4_1 or Q8_0")
    return Quant(per_block)


def is_compact(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.uint8


def dequantize(w: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Compact rows [..., row_bytes] uint8 -> [..., k] in `dtype`: the compiled kernel on a CPU that has
    it (10x faster, same values: tested), else `dequantize_reference`."""
    quant_of(w.shape[-1], k)  # a one-line error for rows that are not compact rows of k weights
    if w.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_kernels():
        return native_dequantize(w.contiguous(), k, dtype)
    return dequantize_reference(w, k, dtype)


def dequantize_reference(w: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Compact rows [..., row_bytes] uint8 -> [..., k] in `dtype` (computed in fp32, as ggml does), in torch ops."""
    quant = quant_of(w.shape[-1], k)
    blocks = w.reshape(*w.shape[:-1], k // BLOCK, quant.block_bytes)  # [..., nb, bytes]
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # [..., nb, 1]
    if quant is Quant.Q4_1:
        m = blocks[..., 2:4].contiguous().view(torch.float16).float()
        codes = blocks[..., 4:]  # [..., nb, 16]
        q = torch.cat([codes & 0x0F, codes >> 4], dim=-1).float()  # weights 0..15, then 16..31
        values = d * q + m
    else:
        values = d * blocks[..., 2:].contiguous().view(torch.int8).float()
    return values.reshape(*w.shape[:-1], k).to(dtype)


def quantize(w: torch.Tensor, quant: Quant) -> torch.Tensor:
    """[..., k] float -> compact rows [..., row_bytes] uint8, rounding as ggml's reference quantizers do."""
    k = w.shape[-1]
    if k % BLOCK:
        raise PartinferError(f"compact weights need rows of a multiple of {BLOCK} weights, not {k}")
    x = w.float().reshape(*w.shape[:-1], k // BLOCK, BLOCK)  # [..., nb, 32]
    if quant is Quant.Q4_1:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = ((x - lo) * inv + 0.5).floor().clamp(0, 15).to(torch.uint8)  # ggml: (x - min) * id + 0.5, truncated
        codes = q[..., :16] | (q[..., 16:] << 4)
        head = torch.cat([d.half().view(torch.uint8), lo.half().view(torch.uint8)], dim=-1)  # [..., nb, 4]
    else:
        amax = x.abs().amax(-1, keepdim=True)
        d = amax / 127
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        codes = (x * inv).round().clamp(-127, 127).to(torch.int8).view(torch.uint8)
        head = d.half().view(torch.uint8)  # [..., nb, 2]
    return torch.cat([head, codes], dim=-1).reshape(*w.shape[:-1], k // BLOCK * quant.block_bytes).contiguous()


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """The input values the compiled compact-row kernels multiply with (they quantize it once per
    matrix, as llama.cpp does): per block of 32, round(x / d) · d with d = max|x| / 127, in fp32."""
    k = x.shape[-1]
    blocks = x.float().reshape(*x.shape[:-1], k // BLOCK, BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return ((blocks * inv).round() * d).reshape(x.shape)


# ---- Down columns ---------------------------------------------------------------------------------
#
# `down` [d, n] is stored by the source (and by `quantize`) as rows along n: output row r's blocks
# each cover 32 neurons. A neuron's down weights are a column of that matrix, and partial loading
# needs them per neuron, so the blocks are split: each neuron keeps its own codes (one per output
# row, `Quant.code_bytes(d)` bytes: Q4_1 nibbles, or Q8_0 int8), and the blocks' scales go into a
# per-layer table, table[b, :, r] = (d, m) (Q4_1) or (d,) (Q8_0) of row r's block b, shared by the
# 32 neurons 32b..32b+31 (original numbering, so a neuron's block is `neuron_id // 32` however the
# neurons are reordered). De-quantizing gives the source's values exactly, in the same bytes per
# weight plus the table (loaded whole: n/32 blocks · d · 2 or 4 bytes per layer).
#
# Q4_1 codes of 32 consecutive outputs are packed as the Q4_1 blocks pack them: byte t holds output
# t in its low nibble and output t + 16 in its high one.


def neuron_blocks(neuron_ids: torch.Tensor) -> torch.Tensor:
    """Original neuron ids [k] -> the down-table block of each [k] int64 (32 neurons per block)."""
    return neuron_ids.long() // BLOCK


def columns_from_rows(rows: torch.Tensor, quant: Quant) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact rows [d, n / 32 * block_bytes] of down (blocks along the neurons) -> (codes [n,
    code_bytes(d)] uint8 per neuron, table [n / 32, table_width, d] fp16)."""
    d = rows.shape[0]
    if d % BLOCK:
        raise PartinferError(f"compact down columns need a width that is a multiple of {BLOCK}, not {d}")
    blocks = rows.reshape(d, -1, quant.block_bytes)  # [d, nb, bytes]
    nb = blocks.shape[1]
    head = 2 * quant.table_width
    table = blocks[..., :head].contiguous().view(torch.float16)  # [d, nb, width]
    table = table.permute(1, 2, 0).contiguous()  # [nb, width, d]
    if quant is Quant.Q4_1:
        packed = blocks[..., 4:]  # [d, nb, 16]
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(d, nb * BLOCK)  # [d, n] codes 0..15
        q = q.t().reshape(nb * BLOCK, d // BLOCK, BLOCK)  # [n, groups of 32 outputs, 32]
        codes = (q[..., :16] | (q[..., 16:] << 4)).reshape(nb * BLOCK, d // 2)
    else:
        codes = blocks[..., 2:].reshape(d, nb * BLOCK).t()  # [n, d] int8 codes as bytes
    return codes.contiguous(), table


def dequantize_columns(codes: torch.Tensor, table: torch.Tensor, blocks: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Down columns: codes [k, code_bytes] of neurons in blocks `blocks` [k] (neuron_id // 32) with
    the layer's table [nb, width, d] -> [k, d] in `dtype`: the compiled kernel on a CPU that has it,
    else `dequantize_columns_reference` (same values, tested)."""
    if codes.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_kernels():
        return native_dequantize_columns(codes.contiguous(), table.contiguous(), blocks.long().contiguous(), dtype)
    return dequantize_columns_reference(codes, table, blocks, dtype)


def dequantize_columns_reference(codes: torch.Tensor, table: torch.Tensor, blocks: torch.Tensor,
                                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`dequantize_columns` in torch ops (fp32 math, as the rows' reference)."""
    k, d = codes.shape[0], table.shape[-1]
    scales = table[blocks.long()].float()  # [k, width, d]
    if table.shape[1] == 2:
        packed = codes.reshape(k, d // BLOCK, 16)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(k, d).float()
        values = scales[:, 0] * q + scales[:, 1]
    else:
        values = scales[:, 0] * codes.view(torch.int8).float()
    return values.to(dtype)
