"""The architecture of a checkpoint, as the runtime needs it: `ModelConfig`, read from `config.json`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from partinfer.common.errors import PartinferError
from partinfer.common.files import read_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activate_in_place(act: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """act(x), written over x where torch has the in-place form (SiLU; the same values), else a new
    tensor. For fresh pre-activations only: a prompt's peak holds one [B, T, m] tensor fewer."""
    return F.silu(x, inplace=True) if act is F.silu else act(x)


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
