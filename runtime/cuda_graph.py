"""GPU decode replayed from a CUDA graph.

Why: a batch-1 decode step on a GPU is a few hundred small kernels (~20 per layer). Launched one by
one from Python, each costs several microseconds of CPU time, and the GPU idles between them, far
below its bandwidth floor. Captured once as a CUDA graph, a whole step is one launch. The step is
`Transformer.decode_at`: static KV cache, fixed shapes, and the slot held in a device tensor, so one
capture serves every token of a generation.

A graph bakes in the tensors it read when captured. `GraphedDecode` is therefore made per generation,
after `end_prompt` has laid out the sentence's active neurons, and is dropped with it.
"""

from __future__ import annotations

import torch

from partinfer.runtime.model import KVCache, Transformer

WARMUP_STEPS = 2  # lazy cuBLAS/cuDNN set-up must happen before capture, on a side stream


class GraphedDecode:
    """One-token decode steps of a batch on CUDA, replayed from one captured graph.

    The warm-up and the capture run the step on placeholder tokens at slot `cache.length`; each
    real step rewrites that slot before reading it, so they leave no trace in the results.
    """

    def __init__(self, model: Transformer, cache: KVCache):
        device = cache.k.device
        if device.type != "cuda":
            raise ValueError("GraphedDecode needs a CUDA cache")
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=device)  # [B], static input
        self.slot = torch.full((1,), cache.length, dtype=torch.long, device=device)  # [1], static input
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(WARMUP_STEPS):
                model.decode_at(self.tokens, cache, self.slot)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = model.decode_at(self.tokens, cache, self.slot)  # [B, V], static output

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] -> logits [B, V] (a buffer the next step overwrites: sample from it first)."""
        if self.cache.length >= self.cache.max_len:
            raise ValueError("the KV cache is full")
        self.tokens.copy_(tokens)
        self.slot.fill_(self.cache.length)
        self.graph.replay()
        self.cache.length += 1
        return self.logits
