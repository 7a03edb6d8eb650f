"""Neuron selection, as pure functions over activation tensors.

Token-wise core neurons (CoreInfer): for each token, the top `token_sparsity` fraction of the FFN
activations `a` (the input of down_proj), scored by |a| ("abs", our default: SiLU/GELU activations
are signed and large negative values matter) or by a itself ("positive", CoreInfer's ReLU rule).
"""

from __future__ import annotations

import torch

CORE_SCORES = ("abs", "positive")


def core_score(a: torch.Tensor, score: str) -> torch.Tensor:
    """Per-neuron importance of activations a [..., n]."""
    return a.abs() if score == "abs" else a


def token_core_mask(a: torch.Tensor, token_sparsity: float, score: str = "abs") -> torch.Tensor:
    """a [T, n] -> bool [T, n]: True where neuron i is among token t's top round(token_sparsity * n)."""
    n = a.shape[-1]
    k = max(1, round(token_sparsity * n))
    top = torch.topk(core_score(a.float(), score), k, dim=-1).indices
    return torch.zeros(a.shape, dtype=torch.bool, device=a.device).scatter_(-1, top, True)
