"""Token generation over `prefill()` / `decode_step()`: batching by left padding, sampling, timing, streaming."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from partinfer.common.errors import PartinferError
from partinfer.runtime.model import KVCache, Transformer, decode_step, prefill
from partinfer.runtime.process_memory import release_free_heap


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:
            raise PartinferError(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PartinferError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise PartinferError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.seed < 2**63:
            raise PartinferError(f"--seed must be in [0, 2^63), got {self.seed}")


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per sequence (up to and including a stop token)
    prompt_tokens: int  # real prompt tokens in the batch
    prefill_s: float
    decode_s: float
    decode_steps: int
    stats: dict = field(default_factory=dict)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        """Tokens per second per sequence (batch-1 rate when B = 1)."""
        return self.decode_steps / self.decode_s if self.decode_s else 0.0


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None,
           argmax: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.argmax(dim=-1)) -> torch.Tensor:
    """logits [B, V] -> tokens [B]; `argmax` for greedy decoding (a backend's, see runtime/decode.py)."""
    if cfg.temperature == 0:
        return argmax(logits)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> tokens [B, T] and attention mask [B, T], padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise PartinferError("empty prompt; give at least one token of text")
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p) :] = torch.tensor(p)
        mask[b, T - len(p) :] = 1
    return tokens, mask


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: set[int] | frozenset[int] = frozenset(),
    cache: KVCache | None = None,
    on_token: Callable[[torch.Tensor], bool | None] | None = None,
    pad_id: int = 0,
) -> GenerationResult:
    """Generate for a batch of prompts. With `cache` given and non-empty, the prompt continues it (chat turns).

    `on_token(tokens [B])` is called after each new token; returning True stops early (Ctrl-C, stop strings).
    The prompt is a new sentence (each sparse layer selects its neurons from it); decode steps run on
    the model's backend (runtime/decode.py).
    """
    device = model.device
    tokens, mask = left_pad(prompts, pad_id)
    B, T = tokens.shape
    if cache is None:
        cache = KVCache(model.cfg, B, min(model.cfg.max_seq_len, T + max_new_tokens), model.dtype, device)
    if cache.length + T + max_new_tokens > cache.max_len:
        raise PartinferError(
            f"prompt ({T} tokens) + {max_new_tokens} new tokens exceed the context of {cache.max_len - cache.length} "
            "free positions; shorten the prompt or lower --max-new-tokens"
        )
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.temperature else None
    t0 = time.perf_counter()
    first_chunk = cache.length == 0
    logits = prefill(model, tokens.to(device), cache, mask.to(device) if first_chunk else None)[:, -1]
    argmax = model.backend.argmax
    nxt = sample(logits, sampling, generator, argmax)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    steps = 0
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long) if stop_ids else None
    for step in range(max_new_tokens):
        nxt_cpu = nxt.cpu()
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt_cpu[b]))
        if stop is not None:
            done |= torch.isin(nxt_cpu, stop)
        if on_token is not None and on_token(nxt_cpu):
            break
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = decode_step(model, nxt, cache)
        nxt = sample(logits, sampling, generator, argmax)
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    del logits, nxt
    release_free_heap()  # the decode steps' freed buffers (logits, activations) go back, as the prompt's did
    return GenerationResult(out, int(mask.sum()), t1 - t0, t2 - t1, steps)
