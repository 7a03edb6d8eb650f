"""Compact weights in the runtime: the block formats' reference code (common/formats/blocks.py), or the
compiled kernels where a format has them, chosen per call by the format's record, never by a size.

Down columns (see common/formats/pack_format.py): `columns_from_rows` splits a down matrix's blocks
into per-neuron codes and a per-layer table of block scales; `dequantize_columns` puts them back.
"""

from __future__ import annotations

import torch

from partinfer.common.errors import PartinferError
from partinfer.common.formats.blocks import BlockFormat
from partinfer.runtime.native import cpu_kernels
from partinfer.runtime.native import dequantize as native_dequantize
from partinfer.runtime.native import dequantize_k as native_dequantize_k
from partinfer.runtime.native import dequantize_columns as native_dequantize_columns
from partinfer.runtime.native import dequantize_columns_k as native_dequantize_columns_k

ACTIVATION_BLOCK = 32  # the compiled kernels quantize their input per 32 values (`quantize_activation`)


def native_kernel(fmt: BlockFormat, t: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Which compiled ops de-quantize `t` (of format `fmt`) into `dtype` here: "rows" (the format's
    decode kernels, which de-quantize too), "k" (a de-quantizer alone: the K-quants), or None (the
    format's reference in torch ops)."""
    if t.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not cpu_kernels():
        return None
    return "rows" if fmt.kernel is not None else "k" if fmt.dequant_kernel is not None else None


def dequantize(w: torch.Tensor, fmt: BlockFormat, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Compact rows [..., row_bytes] uint8 in `fmt` -> [..., k] in `dtype`: the compiled kernel where the
    format has one (10x faster, same values: tested), else the format's reference."""
    if w.shape[-1] != fmt.row_bytes(k):
        raise PartinferError(f"{fmt.name} rows of {k} weights are {fmt.row_bytes(k)} bytes, not {w.shape[-1]}; "
                             "the checkpoint is damaged or of another format")
    native = native_kernel(fmt, w, dtype)
    if native == "rows":  # 2-D rows are read in place with their row stride (every other row of gate/up pairs)
        return native_dequantize(w if w.dim() == 2 and w.stride(-1) == 1 else w.contiguous(), k, dtype)
    if native == "k":
        return native_dequantize_k(w.contiguous(), k, fmt.dequant_kernel, dtype)
    return fmt.dequantize(w, k, dtype)


def quantize_activation(x: torch.Tensor, block: int = ACTIVATION_BLOCK) -> torch.Tensor:
    """The input values the compiled compact-row kernels multiply with (they quantize it once per
    matrix, as llama.cpp does): per block of 32 (256 for the K-quants' kernels, llama.cpp's Q8_K),
    round(x / d) · d with d = max|x| / 127, in fp32."""
    k = x.shape[-1]
    blocks = x.float().reshape(*x.shape[:-1], k // block, block)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return ((blocks * inv).round() * d).reshape(x.shape)


# ---- Down columns ---------------------------------------------------------------------------------


def neuron_blocks(neuron_ids: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """Original neuron ids [k] -> the down-table block of each [k] int64."""
    return neuron_ids.long() // fmt.block


def neuron_scale_groups(neuron_ids: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """Original neuron ids [k] -> the group of neurons whose down values share one scale per output [k]
    int64: the block (Q4_1, Q8_0), or the K-quant sub-block (id // 32 for Q4_K, // 16 for Q6_K) that the
    compiled decode's column sums group by."""
    return neuron_ids.long() // fmt.group


def quantize_column_activations(a: torch.Tensor, neuron_ids: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """The activations the compiled K-quant down-column sums multiply with: a [..., j] of the neurons
    `neuron_ids` [j], quantized to 8 bits per block of neurons (256, as llama.cpp's Q8_K quantizes down's
    input): round(a / u) · u with u = max |a| / 127 over the block's entries, in fp32."""
    groups = neuron_ids.long() // fmt.block  # [j]
    a = a.float()
    amax = torch.zeros(*a.shape[:-1], int(groups.max()) + 1 if groups.numel() else 1)
    amax = amax.scatter_reduce(-1, groups.expand_as(a), a.abs(), reduce="amax")
    u = amax.gather(-1, groups.expand_as(a)) / 127
    inv = torch.where(u != 0, 1.0 / u, torch.zeros_like(u))
    return (a * inv).round() * u


def down_table_shape(fmt: BlockFormat, n: int, d: int) -> tuple[int, int, int]:
    """A layer's down table: [n / block, head_bytes / 2, d], each block's head kept as 2-byte units
    (fp16: for Q4_1 and Q8_0 they are its scales themselves)."""
    fmt.check_width(n)
    return n // fmt.block, fmt.head_bytes // 2, d


def columns_from_rows(rows: torch.Tensor, fmt: BlockFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact rows [d, n / block · block_bytes] of down (blocks along the neurons) -> (codes [n,
    column_code_bytes(d)] uint8 per neuron, table `down_table_shape`), the same values exactly."""
    d = rows.shape[0]
    fmt.check_width(d)
    head, codes = fmt.split(rows.reshape(d, -1, fmt.block_bytes))  # [d, nb, head_bytes], [d, nb, code_bytes]
    nb = head.shape[1]
    table = head.contiguous().view(torch.float16).permute(1, 2, 0).contiguous()  # [nb, head_bytes / 2, d]
    q = fmt.unpack(codes).reshape(d, nb * fmt.block)  # [d, n] codes as values
    q = q.t().reshape(nb * fmt.block, d // fmt.block, fmt.block)  # [n, groups of `block` outputs, block]
    return fmt.pack(q).reshape(nb * fmt.block, fmt.column_code_bytes(d)).contiguous(), table


def rows_from_columns(codes: torch.Tensor, table: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """Every neuron's down columns (codes [n, column_code_bytes(d)] in id order, the layer's table) ->
    the compact rows [d, n / block · block_bytes] they were split from (`columns_from_rows`), bit for bit:
    a dense layer reads its down as the source's rows (runtime/ffn.py `CompactRowsFFN`)."""
    n, d = codes.shape[0], table.shape[-1]
    fmt.check_width(n)
    nb = n // fmt.block
    q = fmt.unpack(codes.reshape(n, d // fmt.block, fmt.code_bytes)).to(torch.uint8).reshape(n, d)  # [n, d] codes
    row_codes = fmt.pack(q.t().reshape(d, nb, fmt.block))  # [d, nb, code_bytes]: a quarter of the bytes through the transpose
    head = table.permute(2, 0, 1).contiguous().view(torch.uint8)  # [d, nb, head_bytes]
    return fmt.join(head, row_codes).reshape(d, nb * fmt.block_bytes).contiguous()


def dequantize_columns(codes: torch.Tensor, table: torch.Tensor, neuron_ids: torch.Tensor, fmt: BlockFormat,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Down columns: codes [k, code_bytes] of the neurons `neuron_ids` [k] (original ids) with the layer's
    table -> [k, d] in `dtype`: the compiled kernel where the format has one, else
    `dequantize_columns_reference` (same values, tested)."""
    native = native_kernel(fmt, codes, dtype)
    if native == "rows":
        blocks = neuron_blocks(neuron_ids, fmt).contiguous()
        return native_dequantize_columns(codes.contiguous(), table.contiguous(), blocks, dtype)
    if native == "k":
        return native_dequantize_columns_k(codes.contiguous(), table.contiguous(), neuron_ids.long().contiguous(),
                                           fmt.dequant_kernel, dtype)
    return dequantize_columns_reference(codes, table, neuron_ids, fmt, dtype)


def dequantize_columns_reference(codes: torch.Tensor, table: torch.Tensor, neuron_ids: torch.Tensor, fmt: BlockFormat,
                                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`dequantize_columns` in torch ops (fp32 math, as the rows' reference): each weight's value from its
    own code, its row's block head and the neuron's position in that block."""
    k, d = codes.shape[0], table.shape[-1]
    ids = neuron_ids.long()
    q = fmt.unpack(codes.reshape(k, d // fmt.block, fmt.code_bytes)).reshape(k, d, 1)  # [k, d, 1]
    halves = table.shape[1]
    head = table[ids // fmt.block].transpose(1, 2).reshape(k, d * halves).view(torch.uint8)
    head = head.reshape(k, d, 2 * halves)  # [k, d, head_bytes]
    return fmt.values(head, q, (ids % fmt.block).reshape(k, 1, 1)).reshape(k, d).to(dtype)
