"""Shared fixtures: the prepared default model (converted once into the cache) and tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as bf16 safetensors (`make test` prepares it first)."""
    from partinfer.runtime.prepare import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import save_tiny_model

    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_with_tokenizer(default_model_dir, tmp_path_factory) -> Path:
    """A tiny random Llama with the default model's tokenizer (so text goes in and out): `root/model`,
    and its neuron file `root/neurons.safetensors`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from tests.helpers import make_neuron_file

    root = tmp_path_factory.mktemp("lmeval")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(root / "model")
    make_neuron_file(root / "model", root / "neurons.safetensors")
    return root
