"""Measuring each layer's sensitivity to a partial load (`partinfer neurons sensitivity`).

A layer's sensitivity is how far the model's next-token distribution moves when that layer alone
keeps only its top γ·n neurons (by a neuron file's ranking) and every other layer stays dense: the
mean KL(dense ‖ truncated) per token over calibration prompts. `--budget profiled` then gives the
loaded neurons to the layers where a neuron buys the most of that loss back (runtime/sparsity.py).
On the default model it is U-shaped over depth (docs/results.md), which the activation statistics
alone do not show.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from partinfer.common.neuron_file import LayerSensitivity, NeuronFile
from partinfer.profiler.stats import require_plain_ffns
from partinfer.runtime.kernels import linear
from partinfer.runtime.ffn import FFN, FeedForward
from partinfer.runtime.model import KVCache, Transformer, prefill
from partinfer.runtime.sparsity import fraction_count


class TruncatedFFN(FeedForward):
    """A dense FFN cut to the `loaded` neurons: the layer as load-only at γ computes it."""

    def __init__(self, ffn: FFN, loaded: torch.Tensor):  # loaded: int64 [k] neuron indices
        super().__init__()
        n = ffn.down.shape[1]
        self.gate_up = torch.cat([ffn.gate_up[loaded], ffn.gate_up[n + loaded]])  # [2k, d]
        self.down = ffn.down[:, loaded]  # [d, k]
        self.act = ffn.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        gate, up = linear(x, self.gate_up).chunk(2, dim=-1)
        return linear(self.act(gate) * up, self.down)


def log_probs(model: Transformer, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Next-token log-probabilities of every position of every prompt: [T, V] float32 each."""
    out = []
    for ids in prompts:
        cache = KVCache(model.cfg, 1, len(ids), model.dtype, model.device)
        logits = prefill(model, torch.tensor([ids], device=cache.k[0].device), cache, logits_for="all", select=False)
        out.append(torch.log_softmax(logits[0].float(), dim=-1).cpu())
    return out


def mean_kl(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """Mean over all tokens of KL(reference ‖ other), from log-probabilities."""
    total = sum(float((r.exp() * (r - o)).sum()) for r, o in zip(reference, other))
    return total / sum(r.shape[0] for r in reference)


@torch.inference_mode()
def measure_sensitivity(model: Transformer, neurons: NeuronFile, prompts: list[list[int]], gamma: float,
                        progress: bool = True) -> LayerSensitivity:
    """Each layer's sensitivity (see the module docstring) on token-id `prompts`, for the dense `model`."""
    require_plain_ffns(model, "measuring sensitivity")
    k = fraction_count(gamma, model.cfg.ffn_dim)
    reference = log_probs(model, prompts)
    kl = {}
    for i in tqdm(range(model.cfg.n_layers), desc="sensitivity", unit="layer", disable=not progress):
        dense = model.layers[i].mlp
        loaded = neurons.rank(i).long()[:k].to(dense.down.device)
        model.layers[i].mlp = TruncatedFFN(dense, loaded)
        try:
            kl[i] = mean_kl(reference, log_probs(model, prompts))
        finally:
            model.layers[i].mlp = dense
    return LayerSensitivity(gamma, kl, len(prompts), sum(len(p) for p in prompts))
