"""Fitting the compensation of unloaded neurons (`partinfer compensate`).

Per sparse layer, with x the FFN input and u = Σ_{i not loaded} a_i · down_i what the unloaded
neurons add to its output, the least-squares map W = argmin Σ_tokens ‖x W − u‖² + λ‖W‖² is
(XᵀX + λI)⁻¹ XᵀU, where λ = ridge × mean(diag XᵀX). Only XᵀX and XᵀU [d, d] are accumulated (each
batch in fp32, the running sums in fp64, over the dense model's prefill of calibration prompts), so memory is O(layers × d²) whatever
the number of tokens. A rank-r truncation of W (its SVD) costs 2·r·d weights per layer, the bytes of
2r/3 neurons (a neuron is 3·d weights), and is stored as a [d, r], b [r, d]; at r ≥ d the file holds
W and an identity (twice W's bytes: an upper bound to measure against, not a budget to run).
With every neuron loaded, u = 0 and so is the map.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from partinfer.common.compensation_file import Compensation
from partinfer.runtime.engine import Engine
from partinfer.runtime.generate import left_pad
from partinfer.runtime.kernels import linear
from partinfer.runtime.ffn import FFN, FeedForward
from partinfer.runtime.model import KVCache, Transformer, prefill
from partinfer.runtime.sparsity import LayerPlan, loaded_digest


class CompensationRecorder(FeedForward):
    """The dense FFN, plus the sums XᵀX and XᵀU of its real (non-padding) tokens."""

    def __init__(self, ffn: FFN, unloaded: torch.Tensor):
        super().__init__()
        self.ffn, self.unloaded = ffn, unloaded  # [n - k] neuron indices
        d = ffn.down.shape[0]
        self.xtx = torch.zeros(d, d, dtype=torch.float64)
        self.xtu = torch.zeros(d, d, dtype=torch.float64)
        self.tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        a = self.ffn.activations(x)  # [B, T, n]
        real = self.token_mask.reshape(-1) if self.token_mask is not None else slice(None)  # this chunk's real tokens
        xs = x.reshape(-1, x.shape[-1])[real].float()  # [N, D]
        u = linear(a[..., self.unloaded], self.ffn.down[:, self.unloaded]).reshape(-1, x.shape[-1])[real].float()
        self.xtx += (xs.T @ xs).double().cpu()  # one batch's sum in fp32, the running sums in fp64
        self.xtu += (xs.T @ u).double().cpu()
        self.tokens += xs.shape[0]
        return linear(a, self.ffn.down)


def solve(xtx: torch.Tensor, xtu: torch.Tensor, ridge: float, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ridge solution W [d, d], truncated to `rank`: (a [d, r], b [r, d]) with a @ b ≈ W."""
    d = xtx.shape[0]
    lam = ridge * float(torch.diagonal(xtx).mean()) if ridge > 0 else 0.0
    w = torch.linalg.solve(xtx + lam * torch.eye(d, dtype=xtx.dtype), xtu)  # [d, d]
    if rank >= d:
        return w.float(), torch.eye(d)
    u, s, vt = torch.linalg.svd(w)
    return (u[:, :rank] * s[:rank]).float(), vt[:rank].float()


@torch.inference_mode()
def fit_compensation(engine: Engine, texts: dict[str, list[str]], plans: dict[int, LayerPlan], rank: int,
                     ridge: float = 1e-3, max_prompt_tokens: int = 512, batch_size: int = 8) -> Compensation:
    """Fit every sparse layer's map on the prompts of `texts` (data set name -> prompts), for the
    loaded sets of `plans`; `engine` holds the dense model."""
    model: Transformer = engine.model
    n, d = model.cfg.ffn_dim, model.cfg.dim
    if not plans:
        raise ValueError("no sparse layers to compensate")
    recorders = {}
    for i, plan in plans.items():
        keep = torch.zeros(n, dtype=torch.bool)
        keep[plan.loaded] = True
        recorders[i] = CompensationRecorder(model.layers[i].mlp, (~keep).nonzero()[:, 0].to(model.device))
        model.layers[i].mlp = recorders[i]
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    prompts = [engine.encode(t, chat_template=False)[-max_prompt_tokens:] for items in texts.values() for t in items]
    device, dtype = model.device, model.dtype
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="compensate", unit="batch"):
            tokens, mask = left_pad(prompts[start : start + batch_size], pad)
            cache = KVCache(model.cfg, tokens.shape[0], tokens.shape[1], dtype, device)
            prefill(model, tokens.to(device), cache, mask.to(device), select=False)
    finally:
        for i, r in recorders.items():
            model.layers[i].mlp = r.ffn
    a, b = {}, {}
    for i, r in recorders.items():
        a[i], b[i] = solve(r.xtx, r.xtu, ridge, min(rank, d))
    tokens = next(iter(recorders.values())).tokens
    return Compensation(a, b, model.cfg.fingerprint, loaded_digest(plans, n), min(rank, d), ridge, tokens,
                        tuple(texts))
