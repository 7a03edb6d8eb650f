"""Weight block formats as data: one `BlockFormat` record per format, found by name in `BLOCK_FORMATS`.

A compact matrix is a uint8 tensor [N, K / block * block_bytes]: row r holds the blocks of output row
r along the input dimension K, so a row (a neuron's gate or up row, an attention output row, a token's
embedding) is one contiguous, separately readable run. A block holds its scales (the head) and the
codes of `block` weights. A record says how to turn codes into values and back,
in torch ops (the reference every compiled kernel is tested against), and which compiled kernels take
it (`kernel`, None: the eager reference path only). Adding a format is adding a record (and, for
speed, its kernels); nothing else reads a format's byte layout, and nothing infers a format from a
byte count: every compact tensor is recorded by format name (common/formats/pack_format.py).

  Q4_1  20 bytes per 32 weights: fp16 scale d, fp16 minimum m, 16 bytes of 4-bit codes q (byte j
        holds weight j in its low nibble and weight j + 16 in its high one); w = d·q + m.
  Q8_0  34 bytes per 32 weights: fp16 scale d, 32 int8 codes q; w = d·q.
  Q5_0  22 bytes per 32 weights: fp16 scale d, 32 fifth bits, 16 bytes of 4-bit codes; w = d·(q − 16).
        A Q4_K_M file's stand-in for Q4_K on rows that are not a multiple of 256; eager path only.
  Q4_K, Q6_K  llama.cpp's K-quants, super-blocks of 256 (below): what a Q4_K_M GGUF stores; compiled
        de-quantizers and products (rows, down columns, prompts) on AVX2 and AVX-512 VNNI.

The byte layouts are ggml's, so a GGUF's blocks are kept bit for bit.

`WeightScheme` names the choice a packed checkpoint makes for each kind of matrix (`--weights q4`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from partinfer.common.errors import PartinferError

Tensor = torch.Tensor


@dataclass(frozen=True)
class BlockFormat:
    """One block format. A block is `head_bytes` of scales (`split` takes them out of a block, `join`
    puts them back) and `code_bytes` of codes (`unpack` -> one value per weight). `values` turns a
    block's head and codes into weights: head uint8 [..., head_bytes], q fp32 [..., m] and pos
    [..., m] (each code's position in its block, broadcast against q) -> fp32 [..., m]; a format
    whose scales depend on the position (K-quants' sub-blocks) reads `pos`, others ignore it."""

    name: str
    block: int  # weights per block
    block_bytes: int
    head_bytes: int  # bytes of scales per block (even: a down-column table keeps them as 2-byte units)
    split: Callable[[Tensor], tuple[Tensor, Tensor]]  # blocks [..., block_bytes] -> (head, codes)
    join: Callable[[Tensor, Tensor], Tensor]  # (head, codes) -> blocks
    unpack: Callable[[Tensor], Tensor]  # codes uint8 [..., code_bytes] -> q [..., block] fp32
    pack: Callable[[Tensor], Tensor]  # q [..., block] (as unpack gives them) -> codes uint8 [..., code_bytes]
    values: Callable[[Tensor, Tensor, Tensor], Tensor]  # (head, q, pos) -> weights fp32
    quantize_blocks: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None  # x fp32 [..., b] -> (head, q)
    kernel: str | None = None  # the compiled kernels that take it (runtime/csrc), None: eager reference only
    dequant_kernel: str | None = None  # K-quants: compiled de-quantizer and products (k_quants.h, k_quant_products.h)
    scale_group: int = 0  # weights of a block that share one scale (and offset); 0: the whole block

    @property
    def group(self) -> int:
        """Consecutive weights (neurons, along down's blocks) that share one scale: a block, or a K-quant sub-block."""
        return self.scale_group or self.block

    @property
    def code_bytes(self) -> int:
        """Bytes of one block's codes (a block without its scales)."""
        return self.block_bytes - self.head_bytes

    def row_bytes(self, k: int) -> int:
        """Bytes of a compact row of `k` weights."""
        self.check_width(k)
        return k // self.block * self.block_bytes

    def column_code_bytes(self, k: int) -> int:
        """Bytes of `k` codes without their scales: one neuron's down column (pack_format, "down columns")."""
        self.check_width(k)
        return k // self.block * self.code_bytes

    def check_width(self, k: int) -> None:
        if k <= 0 or k % self.block:
            raise PartinferError(f"{self.name} rows need a width that is a multiple of {self.block}, not {k}; "
                                 "use --weights bf16 for this model")

    def blocks_of(self, rows: Tensor, k: int) -> Tensor:
        """Compact rows [..., row_bytes] -> blocks [..., k / block, block_bytes] (checked)."""
        if rows.dtype != torch.uint8 or rows.shape[-1] != self.row_bytes(k):
            raise PartinferError(f"{self.name} rows of {k} weights are {self.row_bytes(k)} uint8 bytes, "
                                 f"not {rows.shape[-1]} {rows.dtype}; the checkpoint is damaged or of another format")
        return rows.reshape(*rows.shape[:-1], k // self.block, self.block_bytes)

    def dequantize(self, rows: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Compact rows [..., row_bytes] -> [..., k] in `dtype`, computed in fp32 as ggml does."""
        head, codes = self.split(self.blocks_of(rows, k))
        values = self.values(head, self.unpack(codes), torch.arange(self.block))
        return values.reshape(*rows.shape[:-1], k).to(dtype)

    def quantize(self, x: Tensor) -> Tensor:
        """[..., k] float -> compact rows [..., row_bytes] uint8, rounding as ggml's reference quantizers do."""
        if self.quantize_blocks is None:
            raise PartinferError(f"{self.name} has no quantizer; pack from a source that holds {self.name} blocks")
        k = x.shape[-1]
        self.check_width(k)
        head, q = self.quantize_blocks(x.float().reshape(*x.shape[:-1], k // self.block, self.block))
        return self.join(head, self.pack(q)).reshape(*x.shape[:-1], self.row_bytes(k)).contiguous()


def f16(head: Tensor, at: int) -> Tensor:
    """The fp16 value at byte `at` of each head [..., head_bytes] -> fp32 [..., 1]."""
    return head[..., at : at + 2].contiguous().view(torch.float16).float()


def head_first(head_bytes: int) -> tuple[Callable, Callable]:
    """split/join of a block whose scales come first (ggml's Q4_0/1, Q5_0/1, Q8_0, Q4_K)."""
    return (lambda b: (b[..., :head_bytes], b[..., head_bytes:]),
            lambda head, codes: torch.cat([head, codes], dim=-1))


def fp16_head(values: Tensor) -> Tensor:
    """fp32 scales [..., s] -> their fp16 bytes [..., 2s] (a block's head)."""
    return values.to(torch.float16).contiguous().view(torch.uint8)


def _nibbles_unpack(codes: Tensor) -> Tensor:  # [..., 16] -> [..., 32]: low nibbles are weights 0..15
    return torch.cat([codes & 0x0F, codes >> 4], dim=-1).float()


def _nibbles_pack(q: Tensor) -> Tensor:  # [..., 32] 0..15 -> [..., 16]
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def _q4_1_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = ((x - lo) * inv + 0.5).floor().clamp(0, 15)  # ggml: (x - min) * id + 0.5, truncated
    return fp16_head(torch.cat([d, lo], dim=-1)), q


def _q8_0_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    d = x.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return fp16_head(d), (x * inv).round().clamp(-127, 127)


Q4_1 = BlockFormat("Q4_1", 32, 20, 4, *head_first(4), _nibbles_unpack, _nibbles_pack,
                   lambda h, q, pos: f16(h, 0) * q + f16(h, 2), _q4_1_quantize, kernel="q4_1")
Q8_0 = BlockFormat("Q8_0", 32, 34, 2, *head_first(2), lambda c: c.view(torch.int8).float(),
                   lambda q: q.to(torch.int8).view(torch.uint8), lambda h, q, pos: f16(h, 0) * q, _q8_0_quantize,
                   kernel="q8_0")

_BIT = torch.arange(8, dtype=torch.uint8)


def _q5_0_unpack(codes: Tensor) -> Tensor:  # qh [4] | qs [16] -> q [..., 32] in 0..31
    high = ((codes[..., :4, None] >> _BIT) & 1).reshape(*codes.shape[:-1], 32)  # bit j of the 32-bit qh: weight j
    return _nibbles_unpack(codes[..., 4:]) + 16 * high  # fp32


def _q5_0_pack(q: Tensor) -> Tensor:  # q [..., 32] in 0..31 -> qh | qs [..., 20]
    q = q.to(torch.uint8)
    bits = (q >> 4).reshape(*q.shape[:-1], 4, 8)
    qh = (bits << _BIT).sum(-1, dtype=torch.uint8)  # distinct bits: the sum is their or
    return torch.cat([qh, _nibbles_pack(q & 0x0F)], dim=-1)


def _q5_0_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """ggml's reference: d = the signed value of largest magnitude / -16, q = trunc(x / d + 16.5) capped at 31."""
    signed_max = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    d = signed_max / -16
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return fp16_head(d), (x * inv + 16.5).trunc().clamp(0, 31)


# Q5_0, 22 bytes per 32 weights: fp16 d, 4 bytes qh (bit j: weight j's fifth bit), 16 bytes of nibbles
# (as Q4_1's); w = d·(q − 16). What a Q4_K_M file holds instead of Q4_K where a row is not a multiple of
# 256 (Q8_0 stands in for Q6_K there); no compiled kernels: the eager reference path.
Q5_0 = BlockFormat("Q5_0", 32, 22, 2, *head_first(2), _q5_0_unpack, _q5_0_pack, lambda h, q, pos: f16(h, 0) * (q - 16),
                   _q5_0_quantize)


# ---- K-quants (super-blocks of 256) ------------------------------------------------------------------
#
# Q4_K, 144 bytes: fp16 d, fp16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes of nibbles
#   (32-byte chunk c: low nibbles are sub-block 2c's 32 weights, high nibbles sub-block 2c + 1's);
#   w = (d·sc_s)·q − dmin·m_s for a weight of sub-block s.
# Q6_K, 210 bytes: 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 int8 scales (one per 16
#   weights), fp16 d last; per half h of 128 weights, ql byte 64h + j holds weights 128h + j (low
#   nibble) and 128h + 64 + j (high), qh byte 32h + j holds bits 4..5 of weights 128h + 32t + j in its
#   bits 2t..2t+1; w = (d·scale_i)·(q − 32).
QK = 256


def _q4_k_scales(head: Tensor) -> tuple[Tensor, Tensor]:
    """The 12 packed bytes of a Q4_K head (bytes 4..15) -> (scales, mins) fp32 [..., 8] (6 bits each)."""
    p = head[..., 4:16].long()
    lo, hi = p[..., 0:4], p[..., 4:8]  # sub-blocks 0..3: 6 low bits of bytes 0..3 (scale) and 4..7 (min)
    top = p[..., 8:12]  # sub-blocks 4..7: low 4 bits from bytes 8..11, the 2 high bits from bytes 0..7's top
    sc = torch.cat([lo & 63, (top & 15) | ((lo >> 6) << 4)], dim=-1)
    mn = torch.cat([hi & 63, (top >> 4) | ((hi >> 6) << 4)], dim=-1)
    return sc.float(), mn.float()


def _take(table: Tensor, index: Tensor) -> Tensor:
    """table [..., s] gathered along its last dim at index (broadcast against table's leading dims) -> [..., m]."""
    index = index.reshape((1,) * (table.dim() - index.dim()) + tuple(index.shape))
    return torch.take_along_dim(table, index, dim=-1)


def _q4_k_values(head: Tensor, q: Tensor, pos: Tensor) -> Tensor:
    sc, mn = _q4_k_scales(head)
    sub = (pos // 32).long()
    return (f16(head, 0) * _take(sc, sub)) * q - f16(head, 2) * _take(mn, sub)


def _q4_k_unpack(codes: Tensor) -> Tensor:  # [..., 128] -> [..., 256]
    c = codes.reshape(*codes.shape[:-1], 4, 1, 32)
    return torch.cat([c & 0x0F, c >> 4], dim=-2).reshape(*codes.shape[:-1], QK).float()


def _q4_k_pack(q: Tensor) -> Tensor:  # [..., 256] 0..15 -> [..., 128]
    q = q.to(torch.uint8).reshape(*q.shape[:-1], 4, 2, 32)
    return (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*q.shape[:-3], 128)


def _q6_k_unpack(codes: Tensor) -> Tensor:  # ql [128] | qh [64] -> q [..., 256] in 0..63
    ql = codes[..., :128].reshape(*codes.shape[:-1], 2, 1, 64)
    qh = codes[..., 128:].reshape(*codes.shape[:-1], 2, 1, 32)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=-2).reshape(*codes.shape[:-1], 2, 128)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(4, 1)
    high = ((qh >> shifts) & 3).reshape(*codes.shape[:-1], 2, 128)
    return (low | (high << 4)).reshape(*codes.shape[:-1], QK).float()


def _q6_k_pack(q: Tensor) -> Tensor:  # q [..., 256] in 0..63 -> ql | qh [..., 192]
    q = q.to(torch.uint8).reshape(*q.shape[:-1], 2, 128)
    low, high = q & 0x0F, q >> 4
    ql = (low[..., :64] | (low[..., 64:] << 4)).reshape(*q.shape[:-2], 128)
    h = high.reshape(*q.shape[:-2], 2, 4, 32)
    qh = (h[..., 0, :] | (h[..., 1, :] << 2) | (h[..., 2, :] << 4) | (h[..., 3, :] << 6)).reshape(*q.shape[:-2], 64)
    return torch.cat([ql, qh], dim=-1)


def _q6_k_values(head: Tensor, q: Tensor, pos: Tensor) -> Tensor:
    scales = head[..., 0:16].contiguous().view(torch.int8).float()
    return (f16(head, 16) * _take(scales, (pos // 16).long())) * (q - 32)


Q4_K = BlockFormat("Q4_K", QK, 144, 16, *head_first(16), _q4_k_unpack, _q4_k_pack, _q4_k_values,
                   dequant_kernel="q4_k", scale_group=32)
Q6_K = BlockFormat("Q6_K", QK, 210, 18, lambda b: (b[..., 192:], b[..., :192]),
                   lambda head, codes: torch.cat([codes, head], dim=-1), _q6_k_unpack, _q6_k_pack, _q6_k_values,
                   dequant_kernel="q6_k", scale_group=16)

BLOCK_FORMATS: dict[str, BlockFormat] = {f.name: f for f in (Q4_1, Q8_0, Q5_0, Q4_K, Q6_K)}


def block_format(name: object) -> BlockFormat:
    """The registered format called `name`; a one-line error for any other name (a file of a newer version)."""
    if not isinstance(name, str) or name not in BLOCK_FORMATS:
        raise PartinferError(f"unknown weight block format {name!r} (known: {', '.join(BLOCK_FORMATS)}); "
                             "the file was written by another version of partinfer: pack it again")
    return BLOCK_FORMATS[name]


@dataclass(frozen=True)
class WeightScheme:
    """How a packed checkpoint stores each kind of matrix: a block format name, or None for the
    source dtype (bf16). `q4`: a GGUF source's own blocks (the embedded model: Q4_1 with Q8_0
    embeddings; a Q4_K_M model: Q4_K with Q6_K down and output), else attention, FFN gate/up/down in
    Q4_1 and embeddings in Q8_0. `int8`: Q8_0 everywhere. `bf16`: no compaction."""

    name: str
    attention: str | None
    gate_up: str | None
    down: str | None
    embedding: str | None
    # Packing from a GGUF: keep a matrix's own blocks when the GGUF stores it in a registered format
    # (a Q4_K_M file keeps its Q4_K and Q6_K), else use the kind's format above.
    keep_source: bool = False

    @property
    def compact(self) -> bool:
        return self.gate_up is not None


WEIGHT_SCHEMES: dict[str, WeightScheme] = {s.name: s for s in (
    WeightScheme("bf16", None, None, None, None),
    WeightScheme("q4", "Q4_1", "Q4_1", "Q4_1", "Q8_0", keep_source=True),
    WeightScheme("int8", "Q8_0", "Q8_0", "Q8_0", "Q8_0"),
)}


def weight_scheme(name: str) -> WeightScheme:
    if name not in WEIGHT_SCHEMES:
        raise PartinferError(f"unknown --weights {name!r}; choose one of {', '.join(WEIGHT_SCHEMES)}")
    return WEIGHT_SCHEMES[name]
