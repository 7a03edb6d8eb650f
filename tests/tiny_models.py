"""Tiny random Hugging Face models of every supported architecture, saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, tie_word_embeddings=False),
    "llama3-rope": lambda: LlamaConfig(
        **COMMON,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "smollm2-tied": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False),
}


def save_tiny_model(kind: str, directory: Path, seed: int = 0) -> Path:
    """Build a random model of `kind` and save it (fp32 safetensors) into directory."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[kind]()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger-than-init weights so that activations are far from zero and differences show.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(directory)
    return directory
