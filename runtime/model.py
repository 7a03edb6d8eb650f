"""A lean decoder-only transformer (Llama family) with a static KV cache, in the gpt-fast style.

The configuration (runtime/config.py) is a frozen dataclass read from a Hugging Face `config.json`;
the model is plain modules named like transformers' so checkpoints load by name; `prefill()` and
`decode_step()` are the whole forward API. The FFN is a module of its own (runtime/ffn.py) so that
sparse variants can be swapped in without touching attention or the cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from partinfer.common.errors import PartinferError
from partinfer.runtime.config import ModelConfig
from partinfer.runtime.ffn import FFN, FeedForward
from partinfer.runtime.kernels import Embedding, Linear
from partinfer.runtime.native import rms_norm as native_rms_norm
from partinfer.runtime.native import rope as native_rope
from partinfer.runtime.process_memory import release_free_heap

# Prompt tokens per pass through the layers (`prefill`), llama.cpp's default micro-batch: a prompt's
# activations at any moment are one chunk's, whatever its length. Shorter chunks slowed bf16 prompts
# (docs/design.md, "Prefill in chunks").
PREFILL_CHUNK_TOKENS = 512


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in fp32, with linear or Llama-3 scaling as transformers does."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        old_len, factor = cfg.rope_original_max_pos, cfg.rope_factor
        low_wavelen = old_len / cfg.rope_low_freq_factor
        high_wavelen = old_len / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class KVCache:
    """Static, preallocated key/value cache for all layers of a batch.

    Sequences are left-padded to a common length, so every sequence writes the same slot at each
    step; `valid` marks slots that hold real tokens and `pad` gives each sequence's offset, so the
    rope position of slot s in sequence b is s - pad[b].
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, S, hd]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # [B, S]
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)  # [B]
        self.length = 0  # slots used
        self.max_len = max_len

    @staticmethod
    def nbytes(cfg: ModelConfig, batch: int, max_len: int, element_bytes: int) -> int:
        """What the keys and values of such a cache hold: part of a generation's steady state."""
        return 2 * cfg.n_layers * batch * cfg.n_kv_heads * max_len * cfg.head_dim * element_bytes

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def reset(self) -> None:
        self.valid.zero_()
        self.pad.zero_()
        self.length = 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def compiled_input(*tensors: torch.Tensor) -> bool:
    """Whether the compiled elementwise ops take these tensors: bf16 on the CPU."""
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)


class CompiledRMSNorm(RMSNorm):
    """RMSNorm of bf16 CPU rows in one compiled op: the same weight and rounding, one pass over x
    instead of eight ops (a prompt runs two per layer). The loader builds it where the CPU kernels
    are (`Transformer.use_compiled_ops`); the partial sums add in another order than torch's mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not compiled_input(x, self.weight):  # a model cast after loading (`.float()`, `.to`)
            return super().forward(x)
        return native_rms_norm(x.contiguous(), self.weight, self.eps)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The one rope helper: positions [B, T] -> cos, sin [B, 1, T, hd] in `dtype` (fp32 angles, as
    transformers computes them; the compiled decode computes the same in C++)."""
    freqs = positions[:, :, None].float() * inv_freq[None, None, :]  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope(nn.Module):
    """Rotary position embedding of q and k heads: x [B, H, T, hd], cos, sin [B, 1, T, hd] -> [B, H, T, hd]."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + rotate_half(x) * sin


class CompiledRope(Rope):
    """`Rope` of bf16 CPU heads in one compiled op, rounded as the six eager ops round (the loader
    builds it where the CPU kernels are, `Transformer.use_compiled_ops`)."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if not compiled_input(x, cos):  # a model cast after loading
            return super().forward(x, cos, sin)
        return native_rope(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        # q, k and v projections fused into one matmul: rows [q; k; v] (the loader concatenates them).
        self.qkv_proj = Linear(cfg.dim, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_dim, cfg.dim, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.rope: Rope = Rope()

    def forward(
        self,
        x: torch.Tensor,  # [B, T, D]
        cos: torch.Tensor,  # [B, 1, T, hd]
        sin: torch.Tensor,
        k_cache: torch.Tensor,  # [B, Hkv, S, hd] (this layer's slice)
        v_cache: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,  # [B, 1, T, start+T] additive (0 or -inf, x's dtype); None: causal-exact
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        k_cache[:, :, start : start + T] = k
        v_cache[:, :, start : start + T] = v
        return self.attend(q, k_cache[:, :, : start + T], v_cache[:, :, : start + T], mask)

    def forward_at(
        self,
        x: torch.Tensor,  # [B, 1, D]
        cos: torch.Tensor,  # [B, 1, 1, hd]
        sin: torch.Tensor,
        k_cache: torch.Tensor,  # [B, Hkv, S, hd]
        v_cache: torch.Tensor,
        slot: torch.Tensor,  # [1] int64, on the cache's device
        mask: torch.Tensor,  # [B, 1, 1, S] bool
    ) -> torch.Tensor:
        """One token written at a slot held in a device tensor, attending over the whole cache through
        `mask`: fixed shapes and no host reads, as a CUDA graph needs (see `Transformer.decode_at`)."""
        q, k, v = self.project(x, cos, sin)
        k_cache.index_copy_(2, slot, k)
        v_cache.index_copy_(2, slot, v)
        return self.attend(q, k_cache, v_cache, mask)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q [B, H, T, hd], k and v [B, Hkv, T, hd], rope applied to q and k."""
        cfg = self.cfg
        B, T, _ = x.shape
        heads = self.qkv_proj(x).view(B, T, cfg.n_heads + 2 * cfg.n_kv_heads, cfg.head_dim)
        qk, v = heads.split((cfg.n_heads + cfg.n_kv_heads, cfg.n_kv_heads), dim=2)
        if cfg.qk_norm:
            q, k = qk.split((cfg.n_heads, cfg.n_kv_heads), dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        qk, v = qk.transpose(1, 2), v.transpose(1, 2)  # [B, H + Hkv, T, hd], [B, Hkv, T, hd]
        qk = self.rope(qk, cos, sin)  # on q and k heads at once: fewer ops per decode step
        q, k = qk.split((cfg.n_heads, cfg.n_kv_heads), dim=1)
        return q, k, v

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q [B, H, T, hd] over keys/values [B, Hkv, L, hd] -> the o projection [B, T, D]."""
        cfg = self.cfg
        B, _, T, _ = q.shape
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=cfg.n_heads != cfg.n_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp: FeedForward = FFN(cfg)
        self.cfg = cfg

    def forward(self, x, cos, sin, k_cache, v_cache, start, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_at(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`forward` for one token per sequence at a device-tensor slot (see `Attention.forward_at`)."""
        x = x + self.self_attn.forward_at(self.input_layernorm(x), cos, sin, k_cache, v_cache, slot, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

class Transformer(nn.Module):
    """Parameter names mirror transformers' `model.*` so checkpoints map one to one."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens: nn.Module = Embedding(cfg.vocab_size, cfg.dim)  # or a CompactEmbedding (the loader)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head: nn.Module | None = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.checkpoint_bytes_read = 0  # set by the loader: tensor bytes it read from disk
        self.backend = None  # a decode backend (runtime/decode.py) the loader chooses; None: eager steps
        self.prefill_chunk_tokens = PREFILL_CHUNK_TOKENS  # `prefill`'s pass length; the loader sets it for compact rows

    def use_compiled_ops(self) -> None:
        """Swap every residual-stream RMSNorm (two per block and the final one) for `CompiledRMSNorm`,
        keeping its weight, and each layer's rope for `CompiledRope`: for a bf16 model on the CPU with
        the kernels built (the loader decides). The same rounding; a layer's two norms (eight ops each) and
        rope (six) become three ops."""
        def compiled(norm: RMSNorm) -> CompiledRMSNorm:
            swapped = CompiledRMSNorm(norm.weight.shape[0], norm.eps)
            swapped.weight = norm.weight
            return swapped

        for block in self.layers:
            block.input_layernorm = compiled(block.input_layernorm)
            block.post_attention_layernorm = compiled(block.post_attention_layernorm)
            block.self_attn.rope = CompiledRope()
        self.norm = compiled(self.norm)

    def init_buffers(self, device: torch.device | str) -> None:
        """Recompute non-persistent buffers after the model was built on `meta` and weights assigned."""
        self.inv_freq = rope_inv_freq(self.cfg).to(device)

    def decode_at(self, tokens: torch.Tensor, cache: KVCache, slot: torch.Tensor) -> torch.Tensor:
        """tokens [B], one per sequence, written at cache slot `slot` ([1] int64 on the model's device) ->
        logits [B, V]. The same step as `decode_step`, but every shape is fixed (attention runs over the
        whole cache through a mask) and nothing is read back to the host, so a CUDA graph can capture it
        once and replay it for every token (runtime/cuda_graph.py). The caller advances `cache.length`."""
        cache.valid.index_fill_(1, slot, True)
        positions = (slot - cache.pad).clamp(min=0)  # [B]
        x = self.embed_tokens(tokens[:, None])  # [B, 1, D]
        cos, sin = rope_cos_sin(self.inv_freq, positions[:, None], x.dtype)  # [B, 1, 1, hd]
        key_slots = torch.arange(cache.max_len, device=slot.device)  # [S]
        allowed = cache.valid & (key_slots <= slot)[None, :]  # [B, S]
        if self.cfg.sliding_window:
            allowed = allowed & (slot - key_slots < self.cfg.sliding_window)[None, :]
        mask = allowed[:, None, None, :]  # [B, 1, 1, S]
        for i, layer in enumerate(self.layers):
            x = layer.forward_at(x, cos, sin, cache.k[i], cache.v[i], slot, mask)
        return self.logits(self.norm(x))[:, -1]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output head: x [..., D] -> [..., V] (the tied embedding when there is no lm_head)."""
        return self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def output_head(self) -> nn.Module:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (norm weights are never compact, unlike the matrices)."""
        return self.norm.weight.dtype

    def causal_mask_exact(self, cache: KVCache, start: int, T: int) -> bool:
        """One new token after real (unpadded) tokens, with no sliding window: it sees every earlier slot,
        and its rope position is its slot."""
        return T == 1 and start > 0 and not self.cfg.sliding_window and bool(cache.valid[:, :start].all())

    def attention_mask(self, cache: KVCache, start: int, T: int, slots: torch.Tensor) -> torch.Tensor | None:
        """[B, 1, T, L] bool mask of the keys each query sees, or None when plain causal attention is exact.

        None (no mask at all) is faster in SDPA on CPU; it is exact for a single new token when no slot
        before it is padding and no sliding window cuts the context.
        """
        L = start + T
        if self.causal_mask_exact(cache, start, T):
            return None
        key_slots = torch.arange(L, device=slots.device)
        allowed = key_slots[None, :] <= slots[:, None]  # [T, L] causal
        if self.cfg.sliding_window:
            allowed = allowed & (slots[:, None] - key_slots[None, :] < self.cfg.sliding_window)
        mask = allowed[None, None] & cache.valid[:, None, None, :L]  # [B, 1, T, L]
        # A left-pad query row sees no key at all; let it see itself so softmax stays finite.
        return mask | (key_slots[None, :] == slots[:, None])[None, None]

    def forward(self, tokens: torch.Tensor, cache: KVCache, start: int, logits_for: str = "all") -> torch.Tensor | None:
        """tokens [B, T] written to cache slots start..start+T; returns logits [B, T, V] ("all"), [B, 1, V]
        ("last") or None ("none")."""
        B, T = tokens.shape
        x = self.embed_tokens(tokens)
        slots = torch.arange(start, start + T, device=tokens.device)
        positions = (slots[None, :] - cache.pad[:, None]).clamp(min=0)  # [B, T]
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # [B, 1, T, hd]
        mask = self.attention_mask(cache, start, T, slots)
        if mask is not None:  # additive, as SDPA turns a bool mask (-inf where False) in every layer's call
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], start, mask)
        if logits_for == "none":  # an inner prompt chunk: only the cache is wanted
            return None
        if logits_for == "last":
            x = x[:, -1:]
        return self.logits(self.norm(x))


def prefill(
    model: Transformer, tokens: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None,
    logits_for: str = "last", select: bool = True, chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Run a prompt through the model, appending it to the cache.

    tokens [B, T]; attention_mask [B, T] (1 = real token) marks left padding on the first prompt.
    Returns logits [B, 1, V] (`logits_for="last"`) or [B, T, V] (`"all"`).
    `select` (the default): the prompt is a new sentence — sparse layers compute every loaded neuron,
    then choose each sequence's active neurons for the decode that follows. `select=False` runs the
    prompt with the neurons already chosen (teacher-forced scoring of a continuation, decode steps).

    The prompt goes through the layers `chunk_tokens` (default: the model's `prefill_chunk_tokens`)
    tokens at a time (llama.cpp's micro-batch):
    each chunk attends to the cache the earlier ones filled, so the activations a prefill holds at once
    are one chunk's, whatever the prompt's length; the sparse layers' selection statistics are sums
    over tokens, added chunk by chunk.
    """
    B, T = tokens.shape
    start = cache.length
    chunk_tokens = chunk_tokens or model.prefill_chunk_tokens
    if start + T > cache.max_len:
        raise PartinferError(
            f"the input needs {start + T} positions but the context holds {cache.max_len}; "
            "shorten the prompt, lower --max-new-tokens, or start a new conversation"
        )
    real = torch.ones(B, T, dtype=torch.bool, device=tokens.device) if attention_mask is None else attention_mask.bool()
    if start == 0:
        cache.pad.copy_((~real).long().sum(dim=1))
    if select:
        for block in model.layers:
            block.mlp.begin_prompt(B, tokens.device)
    pieces = []
    for s in range(0, T, chunk_tokens):
        e = min(T, s + chunk_tokens)
        cache.valid[:, start + s : start + e] = real[:, s:e]
        for block in model.layers:
            block.mlp.prompt_chunk(real[:, s:e] if attention_mask is not None else None)
        wanted = logits_for if e == T or logits_for == "all" else "none"
        pieces.append(model(tokens[:, s:e], cache, start + s, wanted))
        cache.length = start + e
    for block in model.layers:
        block.mlp.prompt_chunk(None)  # the prompt is over
    logits = pieces[-1] if logits_for == "last" else torch.cat(pieces, dim=1)
    if select:
        for block in model.layers:
            block.mlp.end_prompt()
        if model.backend is not None:
            model.backend.prompt_ended()
        release_free_heap()  # the sentence's transient buffers are freed now; hand their pages back
    return logits


def decode_step(model: Transformer, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One token per sequence through the model's decode backend: token [B] -> logits [B, V]."""
    if model.backend is None:
        return eager_decode_step(model, token, cache)
    return model.backend.decode(model, token, cache)


def eager_decode_step(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The model's PyTorch forward for one token per sequence: tokens [B] -> logits [B, V]."""
    return prefill(model, tokens[:, None], cache, logits_for="last", select=False)[:, -1]
