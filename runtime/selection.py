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


def top_count_mask(a: torch.Tensor, count: int, score: str = "abs") -> torch.Tensor:
    """a [..., n] -> bool [..., n]: True where a neuron is among its token's top `count` by core score."""
    # A mask needs the set, not its order: unsorted selection skips sorting each token's top `count`.
    top = torch.topk(core_score(a.float(), score), count, dim=-1, sorted=False).indices
    return torch.zeros(a.shape, dtype=torch.bool, device=a.device).scatter_(-1, top, True)


def token_core_mask(a: torch.Tensor, token_sparsity: float, score: str = "abs") -> torch.Tensor:
    """a [T, n] -> bool [T, n]: True where neuron i is among token t's top round(token_sparsity * n)."""
    return top_count_mask(a, max(1, round(token_sparsity * a.shape[-1])), score)


def real_token_weights(token_mask: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
    """[B, T, 1] fp32 from the prompt chunk's token_mask [B, T]: 1 for real tokens, 0 for padding; None
    when there is no mask (every token is real). Per-sentence statistics multiply by it."""
    if token_mask is None:
        return None
    assert token_mask.shape[1] == T, "the mask is the chunk's (FeedForward.prompt_chunk)"
    return token_mask[:, :, None].to(device, torch.float32)


STATISTICS_TOKENS = 64  # prompt tokens per step of a sentence's statistics: their fp32 copies stay this small


def add_abs_sums(total: torch.Tensor, a: torch.Tensor, real: torch.Tensor | None) -> None:
    """total [B, k] fp32 += Σ_t real[b, t] · |a[b, t, i]|, for a [B, T, k] and real [B, T, 1] or None (every
    token real). STATISTICS_TOKENS tokens at a time, the fp32 copy of each made in place: a whole
    chunk's fp32 |a| and its masked copy were the largest transients of a prompt's statistics."""
    for t in range(0, a.shape[1], STATISTICS_TOKENS):
        part = a[:, t : t + STATISTICS_TOKENS]
        part = part.abs() if part.dtype == torch.float32 else part.float().abs_()  # [B, t', k] fp32, our own copy
        if real is not None:
            part.mul_(real[:, t : t + STATISTICS_TOKENS])
        total.add_(part.sum(1))


def loaded_order(base_rank: torch.Tensor, other_rank: torch.Tensor, n_base: int, k: int) -> torch.Tensor:
    """The loaded set, in order: the first n_base of base_rank, then other_rank's order skipping those, up to k."""
    base = base_rank[:n_base]
    is_base = torch.zeros(base_rank.shape[0], dtype=torch.bool)
    is_base[base] = True
    rest = other_rank[~is_base[other_rank]]
    return torch.cat([base, rest[: k - n_base]])


def ids_sorted_within(neuron_ids: torch.Tensor, bounds: tuple[int, ...]) -> torch.Tensor:
    """neuron_ids [k] with each segment between consecutive `bounds` (and the ends) sorted ascending.

    Which neurons are base, computed or only loaded is kept; within a segment, neighbours in id share a
    K-quant sub-block's scales, and the column kernels read such a group as one run of rows instead of
    rows scattered in rank order (measured: docs/benchmarks.md)."""
    edges = [0, *sorted(min(max(b, 0), neuron_ids.numel()) for b in bounds), neuron_ids.numel()]
    return torch.cat([neuron_ids[a:b].sort().values for a, b in zip(edges, edges[1:])])


def sentence_active(core_counts: torch.Tensor, mean_abs: torch.Tensor, n_base: int, n_active: int) -> torch.Tensor:
    """Per sequence, positions (into the loaded set) of the active neurons: base, then the ε most stable.

    core_counts, mean_abs [B, k] over a sentence's prompt tokens. Candidates are positions n_base..k-1,
    ranked by how many tokens had them as core neurons, ties broken by larger mean |a| (CoreInfer's
    stability-guided sentence-wise selection). Returns int64 [B, n_active], sorted ascending.
    """
    B, k = core_counts.shape
    n_eps = n_active - n_base
    base = torch.arange(n_base, device=core_counts.device).expand(B, n_base)
    if n_eps <= 0:
        return base[:, :n_active]
    tie_order = torch.sort(mean_abs[:, n_base:], dim=1, descending=True, stable=True).indices
    by_count = torch.sort(torch.gather(core_counts[:, n_base:], 1, tie_order), dim=1, descending=True, stable=True).indices
    chosen = torch.gather(tie_order, 1, by_count[:, :n_eps]) + n_base
    return torch.sort(torch.cat([base, chosen], dim=1), dim=1).values
