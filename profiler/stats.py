"""Streaming activation statistics: per layer and neuron, sum of |a| and core-neuron counts.

`RecordingFFN` replaces a model's `FFN` during profiling; it computes the FFN as usual and adds the
activations of real (non-padding) tokens to an `ActivationStats`. Memory is O(layers x neurons):
no per-token activation is kept.
"""

from __future__ import annotations

import torch

from partinfer.common.errors import PartinferError

from partinfer.runtime.kernels import linear
from partinfer.runtime.ffn import FFN, FeedForward
from partinfer.runtime.model import Transformer
from partinfer.runtime.selection import token_core_mask


class ActivationStats:
    """Running sums over tokens for every FFN layer."""

    def __init__(self, n_layers: int, n_neurons: int, token_sparsity: float = 0.2, core_score: str = "abs"):
        self.sum_abs = [torch.zeros(n_neurons, dtype=torch.float64) for _ in range(n_layers)]
        self.core_count = [torch.zeros(n_neurons, dtype=torch.float64) for _ in range(n_layers)]
        self.tokens = 0
        self.token_sparsity = token_sparsity
        self.core_score = core_score

    def add(self, layer: int, a: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        """a [B, T, n] activations of one forward; only the real tokens of token_mask [B, T] count."""
        flat = a.reshape(-1, a.shape[-1])
        if token_mask is not None:
            flat = flat[token_mask.reshape(-1).to(flat.device)]
        flat = flat.float()
        self.sum_abs[layer] += flat.abs().sum(0).double().cpu()
        self.core_count[layer] += token_core_mask(flat, self.token_sparsity, self.core_score).sum(0).double().cpu()
        if layer == 0:
            self.tokens += flat.shape[0]


class RecordingFFN(FeedForward):
    """The dense FFN, plus a report of its activations a = act(gate(x)) * up(x) to `stats`."""

    def __init__(self, ffn: FFN, layer: int, stats: ActivationStats):
        super().__init__()
        self.ffn, self.layer, self.stats = ffn, layer, stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        a = self.ffn.activations(x)  # [B, T, n]
        self.stats.add(self.layer, a, self.token_mask)  # the prompt chunk's padding does not count
        return linear(a, self.ffn.down)


def require_plain_ffns(model: Transformer, what: str) -> None:
    """The offline passes read every neuron of a dense FFN: refuse a packed or compact model in one line."""
    if not all(isinstance(block.mlp, FFN) for block in model.layers):
        raise PartinferError(f"{what} reads every neuron of a plain checkpoint; pass the original model, "
                             "not a compact (--weights q4 or int8) copy")


def attach_recorders(model: Transformer, stats: ActivationStats) -> None:
    """Swap every layer's FFN for a RecordingFFN that feeds `stats`."""
    require_plain_ffns(model, "profiling")
    for i, block in enumerate(model.layers):
        block.mlp = RecordingFFN(block.mlp, i, stats)


def detach_recorders(model: Transformer) -> None:
    for block in model.layers:
        if isinstance(block.mlp, RecordingFFN):
            block.mlp = block.mlp.ffn
