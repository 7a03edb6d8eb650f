"""The named contract between the FFN modules and the compiled one-token decode (runtime/csrc).

An FFN module describes itself for the compiled decode as an `FfnWeights` record once per sentence
(`FeedForward.decode_weights`); the decode backend turns the layers' records into one C++ decode
plan, checked once (runtime/decode.py). `FfnKind` mirrors `enum FfnKind` in runtime/csrc (a test
pins the two to the same values).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch


class FfnKind(IntEnum):
    """How the compiled decode reads an FFN's matrices; mirrors `enum FfnKind` in runtime/csrc (tests/test_native_kernels.py
    pins the two to the same values)."""

    GATED = 0  # w1 = [gate; up] [2n, d], w2 = down [d, n]
    INTERLEAVED = 1  # w1 rows g0, u0, g1, u1, ... [2m, d] (the active prefix), w2 = down [d, m]; bf16, or K-quant rows (dense)
    TOKENWISE = 2  # w1 = gate, w2 = down_t, w3 = up, all [k, d]; per token base + top by score
    ROWS = 3  # w1 rows g0, u0, g1, u1, ... [2m, d], w2 = down_t [m, d]: every matrix per neuron rows (compact)


@dataclass(frozen=True)
class FfnWeights:
    """One layer's FFN as the compiled one-token decode takes it: the named contract with the C++.

    Matrices are bf16 [rows, d] or compact (common/formats/blocks.py), which ROWS and TOKENWISE take: gate/up
    as uint8 rows of Q4_1 or Q8_0 blocks along d, `w2` (down_t) as uint8 columns whose block scales
    are `down_table` [n / 32, 1 | 2, d] fp16 (the layer's) and `down_block` [rows of w2] int64 (each
    row's block, neuron_id // 32); both None for bf16.

    `w3` is read only by TOKENWISE (the others pass w1 again); `n_base` / `n_active` and `score_scale`
    ([k] fp32: the per-neuron factor of the token-wise score; None: |act(gate)| alone) only by
    TOKENWISE. A sparse FFN builds its record when a sentence ends, so it is fixed until the next."""

    kind: FfnKind
    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor
    n_base: int = 0
    n_active: int = 0
    score_scale: torch.Tensor | None = None
    down_table: torch.Tensor | None = None
    down_block: torch.Tensor | None = None
