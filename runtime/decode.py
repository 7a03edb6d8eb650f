"""Decode backends: how one decode step runs, chosen once per loaded model (`choose_backend`).

Each backend has the same interface — `decode(model, tokens, cache) -> logits`, `prompt_ended()`,
`argmax(logits)` — and runs every case it is not built for through the eager path it inherits:

- `EagerDecode`: the model's PyTorch forward. Any model, dtype, device, batch.
- `CompiledCPUDecode`: a bf16 one-token step of one unpadded sequence on an x86 CPU with AVX2 is
  one C++ op for the whole model (`runtime.native.model_decode`), on bf16 or compact weights;
  batches and padded steps run eager.
- `CUDAGraphDecode`: on CUDA, the fixed-shape step `Transformer.decode_at` captured once per sentence
  as a CUDA graph and replayed per token (runtime/cuda_graph.py).

The compiled step reads each layer's FFN as an `FfnWeights` record (the named contract with the
C++, runtime/decode_contract.py). Records change only when a sentence ends (a new active set, a new score
scale), so the backend turns them into one C++ `DecodePlan` (checked once, in C++) at the first step
after a `prompt_ended()` and passes it by handle to every step until the next.
"""

from __future__ import annotations

import torch

from partinfer.runtime.cuda_graph import GraphedDecode
from partinfer.runtime.decode_contract import FfnWeights
from partinfer.runtime.ffn import decode_kernels
from partinfer.runtime.kernels import CompactEmbedding, CompactLinear, MixedCompactLinear
from partinfer.runtime.model import KVCache, Transformer, eager_decode_step
from partinfer.runtime.native import argmax as native_argmax
from partinfer.runtime.native import cpu_kernels, decode_plan, gemv, model_decode, rms_norm


class EagerDecode:
    """The eager decode backend: the model's PyTorch forward for any model, dtype, device and batch.
    The faster backends subclass it and fall back to it for what they do not cover."""

    def prompt_ended(self) -> None:
        """A sentence ended: FFN weights may have been laid out anew."""

    def decode(self, model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens [B] -> logits [B, V], appending one slot to the cache."""
        return eager_decode_step(model, tokens, cache)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy choice: logits [B, V] -> [B]."""
        return logits.argmax(dim=-1)


def build_decode_plan(model: Transformer) -> object | None:
    """The C++ decode plan for the model's current FFN records (checked once, in C++), or None when a
    layer's FFN has no record now (prefill phase, per-sequence sets, not SiLU, a format without kernels)."""
    records: list[FfnWeights | None] = [block.mlp.decode_weights() for block in model.layers]
    if any(r is None for r in records):
        return None
    none = torch.empty(0)
    maps = [block.mlp.decode_compensation() for block in model.layers]  # offline and per-sentence maps
    qkv = [attention_matrices(b.self_attn.qkv_proj) for b in model.layers]
    layers = {
        "norm1": [b.input_layernorm.weight for b in model.layers], "qkv": [m[0] for m in qkv],
        "k": [m[1] for m in qkv], "v": [m[2] for m in qkv],
        "qkv_bias": [none if b.self_attn.qkv_proj.bias is None else b.self_attn.qkv_proj.bias.float().contiguous()
                     for b in model.layers],
        "o": [b.self_attn.o_proj.weight for b in model.layers], "norm2": [b.post_attention_layernorm.weight for b in model.layers],
        "kind": [int(r.kind) for r in records], "w1": [r.w1 for r in records], "w2": [r.w2 for r in records],
        "w3": [r.w3 for r in records], "n_base": [r.n_base for r in records], "n_active": [r.n_active for r in records],
        "scale": [none if r.score_scale is None else r.score_scale for r in records],
        "down_table": [none if r.down_table is None else r.down_table for r in records],
        "down_block": [none if r.down_block is None else r.down_block for r in records],
        "comp_in": [none if c is None else c[0] for c in maps], "comp_out": [none if c is None else c[1] for c in maps],
    }
    cfg = model.cfg
    return decode_plan(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps, model.inv_freq, layers)


def attention_matrices(qkv_proj: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qkv, k, v) for the plan: the fused q/k/v matrix and two empty tensors, or q, k and v apart when
    they are stored in different formats (MixedCompactLinear)."""
    if isinstance(qkv_proj, MixedCompactLinear):
        q, k, v = (part.weight for part in qkv_proj.parts)
        return q, k, v
    return qkv_proj.weight, torch.empty(0), torch.empty(0)


class CompiledCPUDecode(EagerDecode):
    """One C++ op per decode step for a single unpadded sequence; everything else eager. The op takes
    the sentence's decode plan by handle: built and checked once per sentence (`plans_built` counts)."""

    def __init__(self) -> None:
        self.plan: object | None = None
        self.plan_current = False  # False after a sentence ends: the records may have changed
        self.plans_built = 0

    def prompt_ended(self) -> None:
        self.plan_current = False

    def current_plan(self, model: Transformer) -> object | None:
        if not self.plan_current:
            self.plan, self.plan_current = build_decode_plan(model), True
            self.plans_built += self.plan is not None
        return self.plan

    def decode(self, model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        start = cache.length
        bf16 = model.dtype == torch.bfloat16  # a model cast after loading runs eager
        plan = self.current_plan(model) if tokens.shape[0] == 1 and bf16 else None
        if plan is None or not model.causal_mask_exact(cache, start, 1):
            return super().decode(model, tokens, cache)
        if start + 1 > cache.max_len:
            return super().decode(model, tokens, cache)  # the eager path raises the context error
        cfg = model.cfg
        cache.valid[:, start] = True
        x = model.embed_tokens(tokens).view(-1)  # [D] bf16
        x = model_decode(x, plan, cache.k[:, 0], cache.v[:, 0], start)
        x = rms_norm(x, model.norm.weight, cfg.norm_eps)
        cache.length = start + 1
        head = model.output_head
        if getattr(head, "fmt", None) is not None and head.fmt.dequant_kernel is not None:  # K-quant rows: their product
            return head.attend(x[None]) if head is model.embed_tokens else head(x[None])  # [1, V] bf16
        return gemv(head.weight, x)[None]  # [1, V] bf16

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16) and logits.is_contiguous():
            return native_argmax(logits)  # torch's argmax over a bf16 vocabulary row is slow next to a step
        return super().argmax(logits)


class CUDAGraphDecode(EagerDecode):
    """Decode steps replayed from a CUDA graph captured once per sentence and cache."""

    def __init__(self) -> None:
        self.graph: GraphedDecode | None = None

    def prompt_ended(self) -> None:
        self.graph = None  # the graph baked in the previous sentence's active weights

    def decode(self, model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.graph is None or self.graph.cache is not cache:
            self.graph = GraphedDecode(model, cache)
        return self.graph.step(tokens)


def choose_backend(model: Transformer) -> EagerDecode:
    """The fastest backend this model, dtype and machine support, chosen once after loading."""
    device = model.device
    cfg = model.cfg
    if device.type == "cuda":
        return CUDAGraphDecode()
    plain_llama = not (cfg.qk_norm or cfg.o_bias) and cfg.head_dim % 16 == 0  # q/k/v biases (Qwen2) are taken
    if device.type == "cpu" and model.dtype == torch.bfloat16 and plain_llama and compiled_formats(model) and cpu_kernels():
        return CompiledCPUDecode()
    return EagerDecode()


def compiled_formats(model: Transformer) -> bool:
    """Every compact matrix outside the FFNs (attention, embedding, output head) is in a block format
    that has compiled kernels (the FFNs say so themselves, in `decode_weights`)."""
    if any(isinstance(m, MixedCompactLinear) and len(m.parts) != 3 for m in model.modules()):
        return False  # the compiled step takes one q/k/v matrix per layer, or q, k and v apart
    return decode_kernels(*(m.fmt for m in model.modules() if isinstance(m, (CompactLinear, CompactEmbedding))))
