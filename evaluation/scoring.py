"""Teacher-forced scoring as the runtime computes it: the context is the sentence, the rest is decode.

A sentence (the context) is prefilled with every loaded neuron, which is also when the per-sentence
methods select their active neurons; the scored continuation is then computed with the decode-time
neurons, exactly as generation would compute those tokens. Several continuations of one context
(the choices of a multiple-choice question) share one prefill and one selection, and are scored
together as a batch on copies of the context's KV cache.
"""

from __future__ import annotations

import torch

from partinfer.runtime.model import KVCache, Transformer, prefill


def _expand_cache(cache: KVCache, batch: int) -> KVCache:
    """A batch-`batch` cache whose every sequence starts as a copy of the batch-1 `cache`."""
    big = KVCache.__new__(KVCache)
    big.k = cache.k.expand(-1, batch, -1, -1, -1).contiguous()  # [L, B, Hkv, S, hd]
    big.v = cache.v.expand(-1, batch, -1, -1, -1).contiguous()
    big.valid = cache.valid.expand(batch, -1).contiguous()  # [B, S]
    big.pad = cache.pad.expand(batch).contiguous()
    big.length, big.max_len = cache.length, cache.max_len
    return big


def _right_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> tokens [B, T] and mask [B, T], padded on the right (after the real tokens)."""
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = True
    return tokens, mask


@torch.inference_mode()
def score_continuations(
    model: Transformer, context: list[int], continuations: list[list[int]], score_context: bool = False,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """log p(continuation | context) for each continuation, selection made once on the context.

    Returns ([(logprobs [C_i], is_greedy [C_i]) per continuation], context_logprobs [len(context) - 1]
    or None): with `score_context`, the context's own tokens 1.. are scored too, by the prefill that
    computes them (every loaded neuron), as a runtime computes a prompt.
    """
    device = model.device
    longest = max(len(c) for c in continuations)
    cache = KVCache(model.cfg, 1, len(context) + longest, model.dtype, device)
    ctx_logits = prefill(model, torch.tensor([context], device=device), cache,  # the sentence: selects
                         logits_for="all" if score_context else "last")[0].float()  # [T or 1, V]
    ctx_logprobs = None
    if score_context:
        lp = torch.log_softmax(ctx_logits[:-1], dim=-1)
        ctx_logprobs = lp.gather(1, torch.tensor(context[1:], device=device)[:, None])[:, 0].cpu()
    first = torch.log_softmax(ctx_logits[-1], dim=-1)  # [V], predicts each continuation's first token
    rest = None
    if longest > 1:
        tokens, mask = _right_pad([c[:-1] for c in continuations])
        batch_cache = _expand_cache(cache, len(continuations))
        rest = torch.log_softmax(prefill(model, tokens.to(device), batch_cache, mask.to(device), logits_for="all",
                                         select=False).float(), dim=-1)  # [K, longest - 1, V], decode neurons
    out = []
    for i, cont in enumerate(continuations):
        lp = first[None] if len(cont) == 1 else torch.cat([first[None], rest[i, : len(cont) - 1]])  # [C, V]
        target = torch.tensor(cont, device=device)
        out.append((lp.gather(1, target[:, None])[:, 0].cpu(), (lp.argmax(-1) == target).cpu()))
    return out, ctx_logprobs
