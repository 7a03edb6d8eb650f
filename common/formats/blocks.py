"""Weight block formats as data: one `BlockFormat` record per format, found by name in `BLOCK_FORMATS`.

A compact matrix is a uint8 tensor [N, K / block * block_bytes]: row r holds the blocks of output row
r along the input dimension K, so a row (a neuron's gate or up row, an attention output row, a token's
embedding) is one contiguous, separately readable run. Every block starts with its scales (`scales`
fp16 values) and holds `block` codes after them. A record says how to turn codes into values and back,
in torch ops (the reference every compiled kernel is tested against), and which compiled kernels take
it (`kernel`, None: the eager reference path only). Adding a format is adding a record (and, for
speed, its kernels); nothing else reads a format's byte layout, and nothing infers a format from a
byte count: every compact tensor is recorded by format name (common/formats/pack_format.py).

  Q4_1  20 bytes per 32 weights: fp16 scale d, fp16 minimum m, 16 bytes of 4-bit codes q (byte j
        holds weight j in its low nibble and weight j + 16 in its high one); w = d·q + m.
  Q8_0  34 bytes per 32 weights: fp16 scale d, 32 int8 codes q; w = d·q.

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
    """One block format. Shapes: `...` is any leading shape, `b` = `block`."""

    name: str
    block: int  # weights per block
    block_bytes: int  # bytes per block: 2·scales of fp16 scales, then the codes
    scales: int  # fp16 values at the start of each block
    unpack: Callable[[Tensor], Tensor]  # codes uint8 [..., code_bytes] -> q [..., b] fp32
    pack: Callable[[Tensor], Tensor]  # q [..., b] (integers as unpack gives them) -> codes uint8 [..., code_bytes]
    values: Callable[[Tensor, Tensor], Tensor]  # scales fp32 [..., scales], q fp32 [..., b] -> w fp32 [..., b]
    quantize_blocks: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None  # x fp32 [..., b] -> (scales fp16, q)
    kernel: str | None = None  # the compiled kernels that take it (runtime/csrc), None: eager reference only

    @property
    def code_bytes(self) -> int:
        """Bytes of one block's codes (a block without its scales)."""
        return self.block_bytes - 2 * self.scales

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

    def split(self, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Compact rows [..., row_bytes] -> (scales fp32 [..., k / b, scales], q fp32 [..., k / b, b])."""
        if rows.dtype != torch.uint8 or rows.shape[-1] != self.row_bytes(k):
            raise PartinferError(f"{self.name} rows of {k} weights are {self.row_bytes(k)} uint8 bytes, "
                                 f"not {rows.shape[-1]} {rows.dtype}; the checkpoint is damaged or of another format")
        blocks = rows.reshape(*rows.shape[:-1], k // self.block, self.block_bytes)
        scales = blocks[..., : 2 * self.scales].contiguous().view(torch.float16).float()
        return scales, self.unpack(blocks[..., 2 * self.scales :])

    def dequantize(self, rows: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Compact rows [..., row_bytes] -> [..., k] in `dtype`, computed in fp32 as ggml does."""
        scales, q = self.split(rows, k)
        return self.values(scales, q).reshape(*rows.shape[:-1], k).to(dtype)

    def quantize(self, x: Tensor) -> Tensor:
        """[..., k] float -> compact rows [..., row_bytes] uint8, rounding as ggml's reference quantizers do."""
        if self.quantize_blocks is None:
            raise PartinferError(f"{self.name} has no quantizer; pack from a source that holds {self.name} blocks")
        k = x.shape[-1]
        self.check_width(k)
        scales, q = self.quantize_blocks(x.float().reshape(*x.shape[:-1], k // self.block, self.block))
        head = scales.to(torch.float16).contiguous().view(torch.uint8)  # [..., nb, 2·scales]
        return torch.cat([head, self.pack(q)], dim=-1).reshape(*x.shape[:-1], self.row_bytes(k)).contiguous()


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
    return torch.cat([d, lo], dim=-1), q


def _q8_0_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    d = x.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return d, (x * inv).round().clamp(-127, 127)


Q4_1 = BlockFormat("Q4_1", 32, 20, 2, _nibbles_unpack, _nibbles_pack,
                   lambda s, q: s[..., 0:1] * q + s[..., 1:2], _q4_1_quantize, kernel="q4_1")
Q8_0 = BlockFormat("Q8_0", 32, 34, 1, lambda c: c.view(torch.int8).float(), lambda q: q.to(torch.int8).view(torch.uint8),
                   lambda s, q: s[..., 0:1] * q, _q8_0_quantize, kernel="q8_0")

BLOCK_FORMATS: dict[str, BlockFormat] = {f.name: f for f in (Q4_1, Q8_0)}


def block_format(name: object) -> BlockFormat:
    """The registered format called `name`; a one-line error for any other name (a file of a newer version)."""
    if not isinstance(name, str) or name not in BLOCK_FORMATS:
        raise PartinferError(f"unknown weight block format {name!r} (known: {', '.join(BLOCK_FORMATS)}); "
                             "the file was written by another version of partinfer: pack it again")
    return BLOCK_FORMATS[name]


@dataclass(frozen=True)
class WeightScheme:
    """How a packed checkpoint stores each kind of matrix: a block format name, or None for the
    source dtype (bf16). `q4`: attention, FFN gate/up/down in Q4_1 (the embedded GGUF's own blocks,
    down split into columns), embeddings in Q8_0 (the GGUF's own type for them). `int8`: Q8_0
    everywhere. `bf16`: no compaction."""

    name: str
    attention: str | None
    gate_up: str | None
    down: str | None
    embedding: str | None

    @property
    def compact(self) -> bool:
        return self.gate_up is not None


WEIGHT_SCHEMES: dict[str, WeightScheme] = {s.name: s for s in (
    WeightScheme("bf16", None, None, None, None),
    WeightScheme("q4", "Q4_1", "Q4_1", "Q4_1", "Q8_0"),
    WeightScheme("int8", "Q8_0", "Q8_0", "Q8_0", "Q8_0"),
)}


def weight_scheme(name: str) -> WeightScheme:
    if name not in WEIGHT_SCHEMES:
        raise PartinferError(f"unknown --weights {name!r}; choose one of {', '.join(WEIGHT_SCHEMES)}")
    return WEIGHT_SCHEMES[name]
