"""Which FFN module a layer gets: one rule, so the loader never names an FFN class or its parameters."""

from __future__ import annotations

import torch

from partinfer.runtime.config import ModelConfig
from partinfer.runtime.ffn import FFN, FeedForward, FfnRows
from partinfer.runtime.sparse_ffn import SparseFFN
from partinfer.runtime.sparsity import LayerPlan, SparsityConfig
from partinfer.runtime.tokenwise_ffn import TokenwiseFFN


def build_ffn(cfg: ModelConfig, plan: LayerPlan | None, rows: FfnRows, sparsity: SparsityConfig,
              dtype: torch.dtype) -> FeedForward:
    """A layer's FFN from its loaded rows: the dense layer (no plan), tokenwise, or the per-sentence
    sparse layer. Each builds itself (`from_rows`) from float or compact rows alike."""
    if plan is None:
        return FFN.from_rows(cfg, rows, dtype)
    family = TokenwiseFFN if sparsity.method == "tokenwise" else SparseFFN
    return family.from_rows(cfg, plan, rows, sparsity, dtype)
