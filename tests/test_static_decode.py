"""The fixed-shape decode step that CUDA graphs capture (`Transformer.decode_at`) against `decode_step`.

The graph itself needs a GPU (the last test runs only where CUDA is present); the step it captures is
checked here on the CPU, for every method and for a left-padded batch.
"""

from __future__ import annotations

import pytest
import torch

from partinfer.runtime.generate import generate
from partinfer.runtime.loader import load_model
from partinfer.runtime.model import KVCache, decode_step, prefill
from partinfer.runtime.sparsity import SparsityConfig
from tests.helpers import make_neuron_file
from tests.tiny_models import save_tiny_model

PROMPTS = [[5, 17, 99, 3, 42, 7], [9, 64, 23]]  # the second is left-padded
NEXT = [[11, 2], [23, 31], [8, 77], [64, 5]]  # one token per sequence per step


def copy_cache(cache: KVCache) -> KVCache:
    twin = KVCache.__new__(KVCache)
    twin.k, twin.v, twin.valid, twin.pad = cache.k.clone(), cache.v.clone(), cache.valid.clone(), cache.pad.clone()
    twin.length, twin.max_len = cache.length, cache.max_len
    return twin


@pytest.mark.parametrize("method", ["dense", "partinfer", "tokenwise"])
def test_decode_at_equals_decode_step(tiny_llama_dir, tmp_path, method):
    neurons = make_neuron_file(tiny_llama_dir, tmp_path / "model.safetensors")
    model = load_model(tiny_llama_dir, torch.float32, "cpu",
                       SparsityConfig(method=method, gamma=0.7, delta=0.3, phi=0.4, model_neurons=neurons))
    width = max(map(len, PROMPTS))
    tokens = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    cache = KVCache(model.cfg, len(PROMPTS), width + len(NEXT), torch.float32, "cpu")
    with torch.inference_mode():
        prefill(model, tokens, cache, mask)  # selects each sequence's neurons
        fixed = copy_cache(cache)
        slot = torch.zeros(1, dtype=torch.long)
        for step in NEXT:
            token = torch.tensor(step)
            expected = decode_step(model, token, cache)  # [B, V]
            slot.fill_(fixed.length)
            got = model.decode_at(token, fixed, slot)
            fixed.length += 1
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(fixed.valid, cache.valid)
    torch.testing.assert_close(fixed.k, cache.k, rtol=1e-5, atol=1e-5)


def test_decode_at_respects_a_sliding_window(tmp_path):
    """Mistral-style windows: keys more than `sliding_window` slots back are masked as in the eager path."""
    import json

    directory = save_tiny_model("mistral", tmp_path / "mistral")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"sliding_window": 4}))
    model = load_model(directory, torch.float32, "cpu")
    assert model.cfg.sliding_window == 4
    cache = KVCache(model.cfg, 1, 12, torch.float32, "cpu")
    with torch.inference_mode():
        prefill(model, torch.tensor([PROMPTS[0]]), cache)
        fixed = copy_cache(cache)
        for token in (11, 23, 8):
            expected = decode_step(model, torch.tensor([token]), cache)
            got = model.decode_at(torch.tensor([token]), fixed, torch.tensor([fixed.length]))
            fixed.length += 1
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", ["dense", "partinfer", "tokenwise"])
def test_cuda_graph_generation_equals_eager(tiny_llama_dir, tmp_path, method):
    neurons = make_neuron_file(tiny_llama_dir, tmp_path / "model.safetensors")
    sparsity = SparsityConfig(method=method, gamma=0.7, delta=0.3, phi=0.4, model_neurons=neurons)
    model = load_model(tiny_llama_dir, torch.float32, "cuda", sparsity)
    graphed = generate(model, PROMPTS, 8)
    eager = generate(model, PROMPTS, 8, cuda_graphs=False)
    assert graphed.tokens == eager.tokens
