"""A lean decoder-only transformer (Llama family) with a static KV cache, in the gpt-fast style.

The configuration is a frozen dataclass read from a Hugging Face `config.json`; the model is plain
modules named like transformers' so checkpoints load by name; `prefill()` and `decode_step()` are
the whole forward API. The FFN is a module of its own (`FFN`) so that sparse variants can be
swapped in without touching attention or the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from partinfer.common.errors import PartinferError
from partinfer.common.files import read_json
from partinfer.runtime.kernels import Linear, linear
from partinfer.runtime.process_memory import release_free_heap
from partinfer.runtime.quant import dequantize

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the runtime needs to know about a checkpoint's architecture."""

    model_type: str
    vocab_size: int
    dim: int  # d, hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int  # n, FFN neurons per layer
    norm_eps: float
    max_seq_len: int
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 8192
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len",
                     "rope_original_max_pos"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PartinferError(f"config.json: {name} must be a positive integer, not {value!r}")
        for name in ("norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise PartinferError(f"config.json: {name} must be a positive finite number, not {value!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise PartinferError(f"config.json: sliding_window must be a positive integer, not {self.sliding_window!r}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise PartinferError(
                f"unsupported architecture model_type={self.model_type!r}; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise PartinferError(f"unsupported FFN activation {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.rope_type not in ("default", "linear", "llama3"):
            raise PartinferError(f"unsupported rope scaling {self.rope_type!r}; supported: default, linear, llama3")
        if self.n_heads % self.n_kv_heads:
            raise PartinferError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def fingerprint(self) -> str:
        """Identifies the FFN geometry a neuron file or packed checkpoint was made for."""
        return f"{self.model_type}-L{self.n_layers}-d{self.dim}-n{self.ffn_dim}-v{self.vocab_size}"

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        """Read `config.json` of a Hugging Face model directory."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise PartinferError(f"no config.json in {model_dir}; pass a Hugging Face model directory or run `partinfer prepare`")
        return cls.from_hf_dict(read_json(path, "model config", "fix the file or re-download the model"))

    @classmethod
    def from_hf_dict(cls, c: object) -> "ModelConfig":
        """The config of a transformers `config.json` dict; a missing key or a wrong type is a one-line error."""
        if not isinstance(c, dict):
            raise PartinferError(f"config.json must hold a JSON object, not {type(c).__name__}")
        try:
            return cls._from_hf_dict(c)
        except KeyError as e:
            raise PartinferError(f"config.json lacks the key {e.args[0]!r}; it is not a complete transformers config") from e
        except (TypeError, ValueError, AttributeError, OverflowError, ZeroDivisionError) as e:
            raise PartinferError(f"config.json has a value of the wrong type ({e}); fix the file or re-download the model") from e

    @classmethod
    def _from_hf_dict(cls, c: dict) -> "ModelConfig":
        model_type = c.get("model_type", "<missing>")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise PartinferError(
                f"unsupported architecture model_type={model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if c.get("mlp_bias"):
            raise PartinferError("FFN biases (mlp_bias=true) are not supported")
        # transformers 5 writes `rope_parameters`; older files use rope_theta + rope_scaling.
        rope = dict(c.get("rope_parameters") or {})
        if not rope:
            rope = dict(c.get("rope_scaling") or {})
            rope.setdefault("rope_theta", c.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        n_heads = c["num_attention_heads"]
        sliding = None
        if model_type == "mistral" or (model_type in ("qwen2", "qwen3") and c.get("use_sliding_window")):
            sliding = c.get("sliding_window")
        return cls(
            model_type=model_type,
            vocab_size=c["vocab_size"],
            dim=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=c.get("num_key_value_heads") or n_heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
            ffn_dim=c["intermediate_size"],
            norm_eps=c.get("rms_norm_eps", 1e-6),
            max_seq_len=c.get("max_position_embeddings", 2048),
            hidden_act=c.get("hidden_act", "silu"),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_pos=int(rope.get("original_max_position_embeddings", 8192)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or (model_type in ("llama", "qwen3") and bool(c.get("attention_bias"))),
            o_bias=model_type in ("llama", "qwen3") and bool(c.get("attention_bias")),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding,
        )


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


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The one rope helper: positions [B, T] -> cos, sin [B, 1, T, hd] in `dtype` (fp32 angles, as
    transformers computes them; the compiled decode computes the same in C++)."""
    freqs = positions[:, :, None].float() * inv_freq[None, None, :]  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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

    def forward(
        self,
        x: torch.Tensor,  # [B, T, D]
        cos: torch.Tensor,  # [B, 1, T, hd]
        sin: torch.Tensor,
        k_cache: torch.Tensor,  # [B, Hkv, S, hd] (this layer's slice)
        v_cache: torch.Tensor,
        start: int,
        mask: torch.Tensor,  # [B, 1, T, start+T] bool
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
        qk = qk * cos + rotate_half(qk) * sin  # rope on q and k heads at once: fewer ops per decode step
        q, k = qk.split((cfg.n_heads, cfg.n_kv_heads), dim=1)
        return q, k, v

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q [B, H, T, hd] over keys/values [B, Hkv, L, hd] -> the o projection [B, T, D]."""
        cfg = self.cfg
        B, _, T, _ = q.shape
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=cfg.n_heads != cfg.n_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class FfnKind(IntEnum):
    """How the compiled decode reads an FFN's matrices; mirrors `enum FfnKind` in runtime/csrc/cpu_gemv.cpp
    (tests/test_native_kernels.py pins the two to the same values)."""

    GATED = 0  # w1 = [gate; up] [2n, d], w2 = down [d, n]
    INTERLEAVED = 1  # w1 rows g0, u0, g1, u1, ... [2m, d] (the active prefix), w2 = down [d, m]
    TOKENWISE = 2  # w1 = gate, w2 = down_t, w3 = up, all [k, d]; per token base + top by score
    ROWS = 3  # w1 rows g0, u0, g1, u1, ... [2m, d], w2 = down_t [m, d]: every matrix per neuron rows (compact)


@dataclass(frozen=True)
class FfnWeights:
    """One layer's FFN as the compiled one-token decode takes it: the named contract with the C++.

    Matrices are bf16 [rows, d] or compact (runtime/quant.py), which ROWS and TOKENWISE take: gate/up
    as uint8 rows of Q4_1 or Q8_0 blocks along d, `w2` (down_t) as uint8 columns whose block scales
    are `down_table` [n / 32, 1 | 2, d] fp16 (the layer's) and `down_block` [rows of w2] int64 (each
    row's block, neuron_id // 32); both None for bf16.

    `w3` is read only by TOKENWISE (the others pass w1 again); `n_base` / `n_active` and `score_scale`
    ([k] fp32: the per-neuron factor of the token-wise score; None: |act(gate)| alone) only by
    TOKENWISE. A sparse FFN builds its record when a sentence ends, so it is fixed until the next."""

    kind: FfnKind
    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor
    n_base: int = 0
    n_active: int = 0
    score_scale: torch.Tensor | None = None
    down_table: torch.Tensor | None = None
    down_block: torch.Tensor | None = None


class FeedForward(nn.Module):
    """What every FFN module offers the model and its decode backends.

    A sentence is bracketed by `begin_prompt` (before its prefill: compute every loaded neuron, record
    what selection needs) and `end_prompt` (select, lay out the weights for decode); `prefill(...,
    select=True)` does both. `decode_weights` is this layer for the compiled decode, or None when it
    cannot take it (the eager path then runs the step). A sparse layer may carry a compensation: a
    low-rank map `comp_out(comp_in(x))` that stands in for what its unloaded neurons would add."""

    def __init__(self) -> None:
        super().__init__()
        self.register_parameter("comp_in", None)  # [r, d]
        self.register_parameter("comp_out", None)  # [d, r]

    def set_compensation(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a [d, r], b [r, d] (fp32 from the file): y += (x @ a) @ b, kept in the layer's dtype and device."""
        like = next(p for p in self.parameters() if p is not self.comp_in and p is not self.comp_out)
        dtype = like.dtype if like.is_floating_point() else self.dtype  # compact layers: their compute dtype
        self.comp_in = nn.Parameter(a.t().to(dtype).contiguous().to(like.device), requires_grad=False)
        self.comp_out = nn.Parameter(b.t().to(dtype).contiguous().to(like.device), requires_grad=False)

    def compensate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], y [B, T, D] the computed neurons' output -> y plus the compensation, if any."""
        return y if self.comp_in is None else y + linear(linear(x, self.comp_in), self.comp_out)

    def begin_prompt(self, token_mask: torch.Tensor | None) -> None:
        pass

    def end_prompt(self) -> None:
        pass

    def decode_weights(self) -> FfnWeights | None:
        return None


class FFN(FeedForward):
    """Dense gated FFN: y = down(act(gate(x)) * up(x)), with gate and up fused into one matmul.

    Neuron i is row i of gate (row n + i of `gate_up`) and column i of `down`. Sparse variants replace
    this module.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(2 * cfg.ffn_dim, cfg.dim))  # [gate; up], [2n, d]
        self.down = nn.Parameter(torch.empty(cfg.dim, cfg.ffn_dim))  # [d, n]
        self.act = ACTIVATIONS[cfg.hidden_act]

    def activations(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> a [B, T, n]
        gate, up = linear(x, self.gate_up).chunk(2, dim=-1)
        return self.act(gate) * up

    def decode_weights(self) -> FfnWeights | None:
        """The whole layer (a record per call is cheap: backends ask once per sentence); None for non-SiLU."""
        return FfnWeights(FfnKind.GATED, self.gate_up, self.down, self.gate_up) if self.act is F.silu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        return linear(self.activations(x), self.down)


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

class EagerDecode:
    """The eager decode backend: the model's PyTorch forward for any model, dtype, device and batch.
    The faster backends (runtime/decode.py) subclass it and fall back to it for what they do not cover."""

    def prompt_ended(self) -> None:
        """A sentence ended: FFN weights may have been laid out anew."""

    def decode(self, model: "Transformer", tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens [B] -> logits [B, V], appending one slot to the cache."""
        return prefill(model, tokens[:, None], cache, logits_for="last", select=False)[:, -1]

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy choice: logits [B, V] -> [B]."""
        return logits.argmax(dim=-1)


class CompactEmbedding(nn.Module):
    """The token embedding as compact rows (runtime/quant.py): weight [V, row_bytes] uint8; a lookup
    de-quantizes only the looked-up rows."""

    def __init__(self, vocab_size: int, dim: int, row_bytes: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, row_bytes, dtype=torch.uint8), requires_grad=False)
        self.dim, self.dtype = dim, dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [...] -> [..., D]
        return dequantize(self.weight[tokens], self.dim, self.dtype)


class Transformer(nn.Module):
    """Parameter names mirror transformers' `model.*` so checkpoints map one to one."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.checkpoint_bytes_read = 0  # set by the loader: tensor bytes it read from disk
        self.backend: EagerDecode = EagerDecode()  # the loader puts the fastest one it can here

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
        return linear(self.norm(x), self.output_weight())[:, -1]

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

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

    def forward(self, tokens: torch.Tensor, cache: KVCache, start: int, logits_for: str = "all") -> torch.Tensor:
        """tokens [B, T] written to cache slots start..start+T; returns logits [B, T, V] or [B, 1, V]."""
        B, T = tokens.shape
        x = self.embed_tokens(tokens)
        slots = torch.arange(start, start + T, device=tokens.device)
        positions = (slots[None, :] - cache.pad[:, None]).clamp(min=0)  # [B, T]
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # [B, 1, T, hd]
        mask = self.attention_mask(cache, start, T, slots)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], start, mask)
        if logits_for == "last":
            x = x[:, -1:]
        return linear(self.norm(x), self.output_weight())


def prefill(
    model: Transformer, tokens: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None,
    logits_for: str = "last", select: bool = True,
) -> torch.Tensor:
    """Run a prompt chunk through the model, appending it to the cache.

    tokens [B, T]; attention_mask [B, T] (1 = real token) marks left padding on the first chunk.
    Returns logits [B, 1, V] (`logits_for="last"`) or [B, T, V] (`"all"`).
    `select` (the default): the chunk is a new sentence — sparse layers compute every loaded neuron,
    then choose each sequence's active neurons for the decode that follows. `select=False` runs the
    chunk with the neurons already chosen (teacher-forced scoring of a continuation, decode steps).
    """
    B, T = tokens.shape
    start = cache.length
    if start + T > cache.max_len:
        raise PartinferError(
            f"the input needs {start + T} positions but the context holds {cache.max_len}; "
            "shorten the prompt, lower --max-new-tokens, or start a new conversation"
        )
    real = torch.ones(B, T, dtype=torch.bool, device=tokens.device) if attention_mask is None else attention_mask.bool()
    cache.valid[:, start : start + T] = real
    if start == 0:
        cache.pad.copy_((~real).long().sum(dim=1))
    if select:
        for block in model.layers:
            block.mlp.begin_prompt(attention_mask.bool() if attention_mask is not None else None)
    logits = model(tokens, cache, start, logits_for)
    cache.length = start + T
    if select:
        for block in model.layers:
            block.mlp.end_prompt()
        model.backend.prompt_ended()
        release_free_heap()  # the sentence's transient buffers are freed now; hand their pages back
    return logits


def decode_step(model: Transformer, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One token per sequence through the model's decode backend: token [B] -> logits [B, V]."""
    return model.backend.decode(model, token, cache)
