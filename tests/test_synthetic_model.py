"""Random-weight models for speed benchmarks (evaluation/synthetic_model.py), on the tiny shape."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from partinfer.evaluation.bench import run_bench
from partinfer.evaluation.synthetic_model import SHAPES, llama_tensor_shapes, profile_random_model, save_random_llama
from partinfer.common.neuron_file import NeuronFile
from partinfer.runtime.loader import load_dense_model
from partinfer.runtime.sparsity import SparsityConfig


def test_random_llama_loads_in_partinfer_and_transformers(tmp_path):
    out = save_random_llama(tmp_path / "model", "tiny")
    ours = load_dense_model(out, torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert sum(p.numel() for p in theirs.parameters()) == sum(
        torch.Size(s).numel() for s in llama_tensor_shapes(SHAPES["tiny"]).values())
    tokens = torch.tensor([[5, 17, 99, 3]])
    from partinfer.runtime.model import KVCache, prefill

    cache = KVCache(ours.cfg, 1, 8, torch.float32, "cpu")
    with torch.inference_mode():
        torch.testing.assert_close(prefill(ours, tokens, cache, logits_for="all"), theirs(tokens).logits,
                                   rtol=1e-4, atol=1e-4)
    mtime = (out / "config.json").stat().st_mtime_ns
    assert save_random_llama(out, "tiny") == out and (out / "config.json").stat().st_mtime_ns == mtime  # reused


def test_gpu_bench_recipe_runs_on_the_tiny_shape(tmp_path):
    """scripts/gpu_bench.py's steps (random model, neuron file, bench of dense and partinfer), on the CPU."""
    out = save_random_llama(tmp_path / "model", "tiny")
    neurons = profile_random_model(out, tmp_path / "neurons.safetensors", prompts=2, prompt_len=8, gen_tokens=2)
    assert NeuronFile.load(neurons).n_layers == SHAPES["tiny"]["num_hidden_layers"]
    report = run_bench(str(out), ("dense", "partinfer"), SparsityConfig(model_neurons=neurons), prompt_len=8,
                       new_tokens=4, repeats=1, peers=False)
    dense, partinfer = report["rows"]
    assert partinfer["bytes_per_token"] < dense["bytes_per_token"] and partinfer["decode_tps"] > 0
