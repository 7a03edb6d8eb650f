"""Test helpers: neuron files for tiny models, made by the real profiler."""

from __future__ import annotations

from pathlib import Path

import torch

from common.neuron_file import NeuronFile
from profiler.profile import ProfileConfig, profile_prompts
from runtime.loader import load_dense_model


def tiny_prompts(count: int = 6, seed: int = 0, vocab: int = 128) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(4, 16, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def make_neuron_file(model_dir: Path, path: Path, seed: int = 0, level: str = "model") -> Path:
    """Profile a tiny model on random prompts and save a neuron file."""
    model = load_dense_model(model_dir, dtype=torch.float32)
    cfg = ProfileConfig(num_samples=6, gen_tokens=4, batch_size=3)
    stats = profile_prompts(model, tiny_prompts(seed=seed), cfg)
    nf = NeuronFile(
        sum_abs=stats.sum_abs, core_count=stats.core_count, tokens=stats.tokens, model="tiny",
        fingerprint=model.cfg.fingerprint, level=level, datasets=(f"random-{seed}",), sequences=6,
        gen_tokens=4, token_sparsity=0.2, core_score="abs",
    )
    return nf.save(path)
