"""A lean decoder-only transformer (Llama family) with a static KV cache, in the gpt-fast style.

The configuration is a frozen dataclass read from a Hugging Face `config.json`; the model is plain
modules named like transformers' so checkpoints load by name; `prefill()` and `decode_step()` are
the whole forward API. The FFN is a module of its own (`FFN`) so that sparse variants can be
swapped in without touching attention or the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import PartinferError
from common.files import read_json
from runtime.kernels import Linear, linear
from runtime.native import attention_decode, cpu_kernels, model_decode, rms_norm

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
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous() and cpu_kernels():
            return rms_norm(x, self.weight, self.eps)  # one op instead of eight: decode is op-bound
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


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


# An FFN as the compiled one-token model takes it: (kind, w1, w2, w3, n_base, n_active, score_scale), see
# runtime/csrc/cpu_gemv.cpp `FfnKind`. Gated: w1 = [gate; up] [2n, d], w2 = down [d, n]; interleaved:
# w1 rows g0, u0, g1, u1, ...; token-wise: w1 = gate, w2 = down_t, w3 = up (all [k, d]) and score_scale
# [k] fp32, the per-neuron factor of its ranking (None: rank by |act(gate)| alone; see TokenwiseFFN).
FfnSpec = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int, int, torch.Tensor | None]
FFN_GATED, FFN_INTERLEAVED, FFN_TOKENWISE = 0, 1, 2


class FFN(nn.Module):
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

    def fused_decode_weights(self) -> FfnSpec | None:
        """This FFN for the compiled one-token model (`runtime.native.model_decode`); None for non-SiLU."""
        return (FFN_GATED, self.gate_up, self.down, self.gate_up, 0, 0, None) if self.act is F.silu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        return linear(self.activations(x), self.down)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp: nn.Module = FFN(cfg)
        self.cfg = cfg

    def forward(self, x, cos, sin, k_cache, v_cache, start, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_at(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`forward` for one token per sequence at a device-tensor slot (see `Attention.forward_at`)."""
        x = x + self.self_attn.forward_at(self.input_layernorm(x), cos, sin, k_cache, v_cache, slot, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode_token(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, pos: int) -> torch.Tensor:
        """One token through the layer with a compiled attention and the FFN module (token-wise FFNs).

        x [D] bf16, cos/sin [hd], k/v_cache [Hkv, S, hd].
        """
        cfg, attn = self.cfg, self.self_attn
        x = x + attention_decode(self.input_layernorm(x), attn.qkv_proj.weight, attn.o_proj.weight, k_cache, v_cache,
                                 cos, sin, pos, cfg.n_heads, cfg.n_kv_heads)
        return x + self.mlp(self.post_attention_layernorm(x)[None, None]).view(-1)


@dataclass(frozen=True)
class DecodePlan:
    """`model_decode`'s per-layer argument lists, kept between decode steps: gathering them from the
    modules costs ~0.3 ms in Python, ~4% of a step on the development CPU. A plan holds while every
    layer's FFN returns the same spec objects (compared by identity; sparse FFNs return new ones when
    their active set or score scale changes); attention and norm weights are fixed after loading."""

    ffn_specs: tuple[FfnSpec, ...]
    norm1: list[torch.Tensor]
    qkv: list[torch.Tensor]
    o: list[torch.Tensor]
    norm2: list[torch.Tensor]
    kind: list[int]
    w1: list[torch.Tensor]
    w2: list[torch.Tensor]
    w3: list[torch.Tensor]
    n_base: list[int]
    n_active: list[int]
    scale: list[torch.Tensor]  # empty tensor: no per-neuron scale

    @classmethod
    def build(cls, model: Transformer, specs: list[FfnSpec]) -> DecodePlan:
        kind, w1, w2, w3, n_base, n_active, scale = (list(column) for column in zip(*specs))
        return cls(
            tuple(specs), [b.input_layernorm.weight for b in model.layers],
            [b.self_attn.qkv_proj.weight for b in model.layers], [b.self_attn.o_proj.weight for b in model.layers],
            [b.post_attention_layernorm.weight for b in model.layers], kind, w1, w2, w3, n_base, n_active,
            [torch.empty(0) if s is None else s for s in scale],
        )

    def built_from(self, specs: list[FfnSpec]) -> bool:
        return len(specs) == len(self.ffn_specs) and all(
            a is b for old, new in zip(self.ffn_specs, specs) for a, b in zip(old, new))


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
        self.decode_plan: DecodePlan | None = None  # model_decode's arguments, kept between tokens

    def init_buffers(self, device: torch.device | str) -> None:
        """Recompute non-persistent buffers after the model was built on `meta` and weights assigned."""
        self.inv_freq = rope_inv_freq(self.cfg).to(device)

    def compiled_decode_ok(self, x: torch.Tensor) -> bool:
        """The compiled one-token ops cover plain Llama attention (no q/k norm, no biases) in bf16 on CPU."""
        cfg = self.cfg
        return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and not cfg.qk_norm and not cfg.qkv_bias
                and not cfg.o_bias and cfg.head_dim % 16 == 0 and cpu_kernels())

    def rope_at(self, pos: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [hd] of one rope position, computed as `forward` computes them for a token."""
        freqs = float(pos) * self.inv_freq  # [hd/2] fp32
        emb = torch.cat((freqs, freqs))
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def decode_token(self, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """x [D] bf16 of the token at slot and rope position `pos` through every layer with compiled ops:
        one op for the whole model when every FFN offers its weights (`fused_decode_weights`: SiLU
        models, every method), else layer by layer."""
        specs = [getattr(layer.mlp, "fused_decode_weights", lambda: None)() for layer in self.layers]
        if all(s is not None for s in specs):
            plan = self.decode_plan
            if plan is None or not plan.built_from(specs):
                plan = self.decode_plan = DecodePlan.build(self, specs)
            return model_decode(x, plan.norm1, plan.qkv, plan.o, cache.k[:, 0], cache.v[:, 0], self.inv_freq, pos,
                                self.cfg.n_heads, self.cfg.n_kv_heads, plan.norm2, plan.kind, plan.w1, plan.w2,
                                plan.w3, plan.n_base, plan.n_active, plan.scale, self.cfg.norm_eps)
        cos, sin = self.rope_at(pos, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer.decode_token(x, cos, sin, cache.k[i][0], cache.v[i][0], pos)
        return x

    def decode_at(self, tokens: torch.Tensor, cache: KVCache, slot: torch.Tensor) -> torch.Tensor:
        """tokens [B], one per sequence, written at cache slot `slot` ([1] int64 on the model's device) ->
        logits [B, V]. The same step as `decode_step`, but every shape is fixed (attention runs over the
        whole cache through a mask) and nothing is read back to the host, so a CUDA graph can capture it
        once and replay it for every token (runtime/cuda_graph.py). The caller advances `cache.length`."""
        cache.valid.index_fill_(1, slot, True)
        positions = (slot - cache.pad).clamp(min=0)  # [B]
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [B, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # [B, 1, 1, hd]
        x = self.embed_tokens(tokens[:, None])  # [B, 1, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
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
        if B == 1 and self.causal_mask_exact(cache, start, T) and self.compiled_decode_ok(x):
            # One token of one unpadded sequence (rope position = slot): compiled ops (runtime/native.py).
            x = self.decode_token(x.view(-1), cache, start).view(1, 1, -1)
        else:
            slots = torch.arange(start, start + T, device=tokens.device)
            positions = (slots[None, :] - cache.pad[:, None]).clamp(min=0)  # [B, T]
            freqs = positions[:, :, None].float() * self.inv_freq[None, None, :]  # [B, T, hd/2]
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, hd]
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
            mask = self.attention_mask(cache, start, T, slots)
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, cache.k[i], cache.v[i], start, mask)
        if logits_for == "last":
            x = x[:, -1:]
        return linear(self.norm(x), self.output_weight())


def prefill(
    model: Transformer, tokens: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None,
    logits_for: str = "last",
) -> torch.Tensor:
    """Run a prompt chunk through the model, appending it to the cache.

    tokens [B, T]; attention_mask [B, T] (1 = real token) marks left padding on the first chunk.
    Returns logits [B, 1, V] (`logits_for="last"`) or [B, T, V] (`"all"`).
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
    logits = model(tokens, cache, start, logits_for)
    cache.length = start + T
    return logits


def decode_step(model: Transformer, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One token per sequence: token [B] -> logits [B, V]."""
    return prefill(model, token[:, None], cache, logits_for="last")[:, -1]
