"""FFN layers: what every FFN module offers (`FeedForward`), the rows a loader hands them (`FfnRows`),
and the dense layer on float (`FFN`) or compact (`CompactFFN`) weights. Sparse variants:
runtime/sparse_ffn.py, runtime/tokenwise_ffn.py; which one a layer gets: runtime/ffns.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from partinfer.common.formats.blocks import BlockFormat
from partinfer.runtime.config import ACTIVATIONS, ModelConfig, activate_in_place
from partinfer.runtime.decode_contract import FfnKind, FfnWeights
from partinfer.runtime.kernels import in_token_chunks, k_product_kernel, linear, prompt_gemm_kernel, prompt_positions
from partinfer.runtime.native import down_k as native_down_k
from partinfer.runtime.native import q4_1_columns_gemm as native_q4_1_columns_gemm
from partinfer.runtime.quant import (dequantize_columns, down_table_shape, neuron_blocks, neuron_scale_groups,
                                     rows_from_columns)


@dataclass(frozen=True)
class FfnRows:
    """One FFN layer's loaded neurons as read from a checkpoint, neuron-major, in the plan's order:
    what every FFN module builds itself from (`from_rows`), so no loader names their parameters.

    Float rows: gate, up, down_t [k, d]. Compact rows (both formats set): gate and up [k, row_bytes]
    uint8 in `gate_up_format`; down_t [k, column_code_bytes(d)] uint8 codes in `down_format`, whose
    block heads are the layer's `down_table` [n / block, head_bytes / 2, d] (2-byte units) (common/formats/pack_format.py)."""

    neuron_ids: torch.Tensor  # [k] int64 original neuron indices
    gate: torch.Tensor
    up: torch.Tensor
    down_t: torch.Tensor
    down_table: torch.Tensor | None = None
    gate_up_format: BlockFormat | None = None
    down_format: BlockFormat | None = None

    @property
    def compact(self) -> bool:
        return self.gate_up_format is not None


class FeedForward(nn.Module):
    """What every FFN module offers the model and its decode backends.

    A sentence is bracketed by `begin_prompt` (before its prefill: compute every loaded neuron, record
    what selection needs) and `end_prompt` (select, lay out the weights for decode); `prefill(...,
    select=True)` does both. `prefill` also names, by `prompt_chunk`, the real tokens of each chunk of
    the prompt it runs (statistics skip padding). `decode_weights` is this layer for the compiled
    decode, or None when it cannot take it (the eager path then runs the step). A sparse layer may
    carry a compensation: a low-rank map `comp_out(comp_in(x))` that stands in for what its unloaded
    neurons would add."""

    def __init__(self) -> None:
        super().__init__()
        self.register_parameter("comp_in", None)  # [r, d]
        self.register_parameter("comp_out", None)  # [d, r]
        self.token_mask: torch.Tensor | None = None  # [B, t] real tokens of the prompt chunk being prefilled

    def set_compensation(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a [d, r], b [r, d] (fp32 from the file): y += (x @ a) @ b, kept in the layer's dtype and device."""
        like = next(p for p in self.parameters() if p is not self.comp_in and p is not self.comp_out)
        dtype = like.dtype if like.is_floating_point() else self.dtype  # compact layers: their compute dtype
        self.comp_in = nn.Parameter(a.t().to(dtype).contiguous().to(like.device), requires_grad=False)
        self.comp_out = nn.Parameter(b.t().to(dtype).contiguous().to(like.device), requires_grad=False)

    def compensate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], y [B, T, D] the computed neurons' output -> y plus the compensation, if any."""
        return y if self.comp_in is None else y + linear(linear(x, self.comp_in), self.comp_out)

    def decode_compensation(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The low-rank map the compiled decode adds, ([r, d], [d, r]), or None."""
        return None if self.comp_in is None else (self.comp_in, self.comp_out)

    def begin_prompt(self, batch: int, device: torch.device) -> None:
        """A new sentence's prefill of `batch` sequences starts: forget the last one's statistics. A layer
        that keeps statistics makes their accumulators here, before the prompt's first transient: made
        during the prefill, each small tensor kept from one layer to the end of the prompt took a bite of a
        freed activation's heap space, and the holes grew layer by layer (docs/design.md, "Prefill in chunks")."""

    def prompt_chunk(self, token_mask: torch.Tensor | None) -> None:
        """token_mask [B, t] (True = real token, None = all real): the prompt chunk the next forward gets."""
        self.token_mask = token_mask

    def end_prompt(self) -> None:
        pass

    def decode_weights(self) -> FfnWeights | None:
        return None


class FFN(FeedForward):
    """Dense gated FFN: y = down(act(gate(x)) * up(x)), with gate and up fused into one matmul.

    Neuron i is row i of gate (row n + i of `gate_up`) and column i of `down`. Sparse variants replace
    this module; `CompactFFN` is the same layer on compact rows.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(2 * cfg.ffn_dim, cfg.dim))  # [gate; up], [2n, d]
        self.down = nn.Parameter(torch.empty(cfg.dim, cfg.ffn_dim))  # [d, n]
        self.act = ACTIVATIONS[cfg.hidden_act]

    @classmethod
    def from_rows(cls, cfg: ModelConfig, rows: "FfnRows", dtype: torch.dtype) -> FeedForward:
        """The dense layer from every neuron's rows (in original order): float rows, or compact ones."""
        if rows.compact:
            family = CompactRowsFFN if rows_down(rows.gate_up_format, rows.down_format) else CompactFFN
            return family.from_rows(cfg, rows, dtype)
        with torch.device("meta"):
            ffn = cls(cfg)
        ffn.gate_up = nn.Parameter(torch.cat([rows.gate, rows.up]).to(dtype), requires_grad=False)
        ffn.down = nn.Parameter(rows.down_t.t().to(dtype).contiguous(), requires_grad=False)
        return ffn

    def activations(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> a [B, T, n]
        gate, up = linear(x, self.gate_up).chunk(2, dim=-1)
        return self.act(gate) * up

    def decode_weights(self) -> FfnWeights | None:
        """The whole layer (a record per call is cheap: backends ask once per sentence); None for non-SiLU."""
        return FfnWeights(FfnKind.GATED, self.gate_up, self.down, self.gate_up) if self.act is F.silu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        return linear(self.activations(x), self.down)


def decode_kernels(*formats: BlockFormat | None) -> bool:
    """Whether the compiled decode takes rows in these formats (None: float rows, always taken): the
    formats with compiled row kernels, and the K-quants with their products."""
    return all(fmt is None or fmt.kernel is not None or fmt.dequant_kernel is not None for fmt in formats)


def compact_gated_activations(x: torch.Tensor, gate_up: torch.Tensor, fmt: BlockFormat, act) -> torch.Tensor:
    """x [B, T, D], gate_up [m, 2, row_bytes] compact gate/up row pairs -> a = act(gate) * up [B, T, m].

    The gate rows, then the up rows, each read in place with a row stride (by the prompt products, or
    de-quantized), so that act and the product run on contiguous [B, T, m] halves (on the interleaved
    output they ran 5x slower, a tenth of a 64-token prompt on the default model); K-quant pairs outside
    a prompt product go through their compiled product as one interleaved matrix [2m, bytes] (in place)."""
    m = gate_up.shape[0]
    if prompt_gemm_kernel(x, gate_up[:, 0], fmt) is None and k_product_kernel(gate_up.view(2 * m, -1), fmt) is not None:
        h = linear(x, gate_up.view(2 * m, -1), fmt=fmt).unflatten(-1, (-1, 2))  # [B, T, m, 2]
        return act(h[..., 0]).mul_(h[..., 1])
    a = activate_in_place(act, linear(x, gate_up[:, 0], fmt=fmt))  # act and the product in place
    return a.mul_(linear(x, gate_up[:, 1], fmt=fmt))


def rows_down(gate_up_format: BlockFormat, down_format: BlockFormat) -> bool:
    """Whether a dense layer keeps its down as rows along the neurons (the source's own blocks) rather
    than per-neuron columns: for the K-quants, whose row products stream faster than their column sums,
    which only a sparse layer needs (measured: docs/benchmarks.md, "A dense layer's down as rows")."""
    return gate_up_format.dequant_kernel is not None and down_format.dequant_kernel is not None


COLUMN_TILE_BYTES = 4 << 20  # de-quantized down columns per tile of `column_linear`


def column_linear(a: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, neuron_ids: torch.Tensor,
                  fmt: BlockFormat, rows: torch.Tensor | None = None) -> torch.Tensor:
    """a [B, T, j] activations of j neurons whose down columns are compact (`codes` [j, code_bytes],
    their original ids `neuron_ids` [j], the layer's `table`) -> [B, T, D]: K-quant and (for a prompt)
    Q4_1 columns summed in integers by the compiled products; others de-quantized a tile of neurons at a
    time into a's dtype (no transient larger than COLUMN_TILE_BYTES) and summed.
    `rows` [j]: the neurons are codes[rows] with ids neuron_ids[rows] (read in place where the compiled
    K-quant sum takes them, gathered otherwise)."""
    d = table.shape[-1]
    kernel = k_product_kernel(codes, fmt)
    if kernel is not None:  # the compiled column sum, no de-quantized column
        ids = (neuron_ids if rows is None else neuron_ids[rows]).contiguous()
        c = codes.contiguous()
        y = in_token_chunks(a.reshape(-1, ids.numel()), lambda chunk: native_down_k(c, table, ids, chunk, kernel, rows), a.dtype)
        return y.reshape(*a.shape[:-1], d)
    if rows is not None:
        codes, neuron_ids = codes[rows], neuron_ids[rows]
    if prompt_positions(a) and fmt.kernel == "q4_1":  # a prompt: in integers
        c, blocks = codes.contiguous(), neuron_blocks(neuron_ids, fmt).contiguous()
        y = in_token_chunks(a.reshape(-1, c.shape[0]), lambda chunk: native_q4_1_columns_gemm(c, table, blocks, chunk),
                            a.dtype, takes_bf16=True)
        return y.reshape(*a.shape[:-1], d)
    j = codes.shape[0]
    step = max(1, COLUMN_TILE_BYTES // (d * a.element_size()))
    if step >= j:
        return linear(a, dequantize_columns(codes, table, neuron_ids, fmt, a.dtype).t())
    y = None
    for n0 in range(0, j, step):
        down = dequantize_columns(codes[n0 : n0 + step], table, neuron_ids[n0 : n0 + step], fmt, a.dtype)  # [tile, D]
        part = linear(a[..., n0 : n0 + step], down.t())
        y = part if y is None else y + part
    return y


class CompactGatedFFN(FeedForward):
    """What the dense gated FFNs on compact rows share: every neuron's gate and up rows, in original order,

      gate_up  [n, 2, row_bytes(d)] uint8  neuron i's gate and up rows side by side, in `gate_up_format`,
    and a down matrix in `down_format`, laid out by the subclass (per-neuron columns, or rows)."""

    def __init__(self, cfg: ModelConfig, gate_up_format: BlockFormat, down_format: BlockFormat,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dim, self.dtype = cfg.dim, dtype
        self.gate_up_format, self.down_format = gate_up_format, down_format
        self.gate_up = nn.Parameter(torch.empty(cfg.ffn_dim, 2, gate_up_format.row_bytes(cfg.dim), dtype=torch.uint8),
                                    requires_grad=False)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def decodable(self) -> bool:
        """Whether the compiled decode takes this layer: SiLU, and both formats with compiled kernels."""
        return self.act is F.silu and decode_kernels(self.gate_up_format, self.down_format)

    def interleaved_gate_up(self) -> torch.Tensor:
        """[2n, row_bytes] gate and up rows interleaved (g0, u0, g1, ...), a view."""
        return self.gate_up.view(2 * self.gate_up.shape[0], -1)

    def activations(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> a [B, T, n]
        return compact_gated_activations(x, self.gate_up, self.gate_up_format, self.act)


class CompactFFN(CompactGatedFFN):
    """The dense gated FFN on compact rows, down as per-neuron columns:

      down_t      [n, code_bytes] uint8    neuron i's down column codes, in `down_format`,
      down_table  [n / block, head / 2, d] the layer's down block heads (2-byte units).
    The eager path de-quantizes tile by tile into `dtype`; the compiled decode reads the rows as
    FfnKind.ROWS, as it reads a compact sparse layer's active prefix."""

    def __init__(self, cfg: ModelConfig, gate_up_format: BlockFormat, down_format: BlockFormat,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__(cfg, gate_up_format, down_format, dtype)
        n, d = cfg.ffn_dim, cfg.dim
        self.down_t = nn.Parameter(torch.empty(n, down_format.column_code_bytes(d), dtype=torch.uint8), requires_grad=False)
        self.down_table = nn.Parameter(torch.empty(down_table_shape(down_format, n, d), dtype=torch.float16),
                                       requires_grad=False)
        self.register_buffer("neuron_ids", torch.arange(n), persistent=False)

    @classmethod
    def from_rows(cls, cfg: ModelConfig, rows: FfnRows, dtype: torch.dtype) -> "CompactFFN":
        with torch.device("meta"):
            ffn = cls(cfg, rows.gate_up_format, rows.down_format, dtype)
        ffn.gate_up = nn.Parameter(torch.stack([rows.gate, rows.up], dim=1), requires_grad=False)  # [n, 2, bytes]
        ffn.down_t = nn.Parameter(rows.down_t.clone(memory_format=torch.contiguous_format), requires_grad=False)
        ffn.down_table = nn.Parameter(rows.down_table, requires_grad=False)
        ffn.neuron_ids = rows.neuron_ids.clone()
        return ffn

    def decode_weights(self) -> FfnWeights | None:
        """Every neuron as compact rows, when the compiled decode takes the layer."""
        if not self.decodable():
            return None
        gate_up = self.interleaved_gate_up()
        return FfnWeights(FfnKind.ROWS, gate_up, self.down_t, gate_up, down_table=self.down_table,
                          down_block=neuron_scale_groups(self.neuron_ids, self.down_format))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        return column_linear(self.activations(x), self.down_t, self.down_table, self.neuron_ids, self.down_format)

    def decode_bytes(self) -> int:
        table = self.down_table.numel() * self.down_table.element_size()
        return self.gate_up.numel() + self.down_t.numel() + table


class CompactRowsFFN(CompactGatedFFN):
    """The dense gated FFN on K-quant rows, down included:

      down  [d, row_bytes(n)] uint8  output o's row of blocks along the neurons, in `down_format`: the
                                     source's own blocks, put back together from the pack's columns
                                     (`rows_from_columns`, bit for bit), the same bytes.
    The one-token decode reads both as row products (FfnKind.INTERLEAVED, the activations quantized per
    256 as the column sums quantize them); a prompt runs the compiled K-quant products."""

    def __init__(self, cfg: ModelConfig, gate_up_format: BlockFormat, down_format: BlockFormat,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__(cfg, gate_up_format, down_format, dtype)
        self.down = nn.Parameter(torch.empty(cfg.dim, down_format.row_bytes(cfg.ffn_dim), dtype=torch.uint8),
                                 requires_grad=False)

    @classmethod
    def from_rows(cls, cfg: ModelConfig, rows: FfnRows, dtype: torch.dtype) -> "CompactRowsFFN":
        if not torch.equal(rows.neuron_ids, torch.arange(cfg.ffn_dim)):
            raise ValueError("a dense layer's rows come in original order, every neuron")
        with torch.device("meta"):
            ffn = cls(cfg, rows.gate_up_format, rows.down_format, dtype)
        ffn.gate_up = nn.Parameter(torch.stack([rows.gate, rows.up], dim=1), requires_grad=False)  # [n, 2, bytes]
        ffn.down = nn.Parameter(rows_from_columns(rows.down_t, rows.down_table, rows.down_format), requires_grad=False)
        return ffn

    def decode_weights(self) -> FfnWeights | None:
        if not self.decodable():
            return None
        gate_up = self.interleaved_gate_up()
        return FfnWeights(FfnKind.INTERLEAVED, gate_up, self.down, gate_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        return linear(self.activations(x), self.down, fmt=self.down_format)

    def decode_bytes(self) -> int:
        return self.gate_up.numel() + self.down.numel()
