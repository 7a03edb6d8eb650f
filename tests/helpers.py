"""Test helpers: neuron files for tiny models, made by the real profiler."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from partinfer.common.neuron_file import NeuronFile
from partinfer.profiler.profile import ProfileConfig, profile_prompts
from partinfer.runtime.loader import load_dense_model


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


def write_offline_data(home: Path) -> None:
    """Small stand-ins for the built-in tasks' JSONL files (no bigbench download in tests)."""
    rows = {
        "truthfulqa": [{"id": f"t{i}", "prompt": "Q: Is water wet?\nA:", "target": " Yes.", "question": f"Is water wet {i}?",
                        "correct_answers": ["Yes.", "It is."], "incorrect_answers": ["No."],
                        "mc1_choices": ["Yes.", "No.", "Maybe."], "mc1_label": 0} for i in range(4)],
        "squad": [{"id": f"s{i}", "prompt": f"Context: Paris is in France.\nQuestion: Where is Paris {i}?\nAnswer:",
                   "target": "France"} for i in range(4)],
        "coqa": [{"id": f"c{i}", "prompt": "", "target": " A cat.", "story": "A cat sat on the mat. " * 5,
                  "question": "Who sat?"} for i in range(4)],
        "xsum": [{"id": f"x{i}", "prompt": "", "target": " A cat sat.", "document": "The cat sat on the mat all day. " * 8}
                 for i in range(4)],
        "wikilingua": [{"id": f"w{i}", "prompt": "", "target": "", "document": "Wash the dog with warm water and soap. " * 6}
                       for i in range(4)],
    }
    (home / "data").mkdir(parents=True)
    for task, records in rows.items():
        (home / "data" / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def bf16_decode_steps(model_dir: Path, sparsity, prompt: torch.Tensor, eager: bool, tokens=(11, 250, 4)) -> torch.Tensor:
    """Logits [steps, 1, V] of a few decode steps after `prompt` [1, T] on a bf16 model, through the
    eager path or (asserted) the compiled one-op decode with a plan for every layer."""
    from partinfer.runtime.decode import CompiledCPUDecode, EagerDecode, build_decode_plan
    from partinfer.runtime.loader import load_model
    from partinfer.runtime.model import KVCache, decode_step, prefill

    model = load_model(model_dir, torch.bfloat16, "cpu", sparsity)
    if eager:
        model.backend = EagerDecode()
    else:
        assert isinstance(model.backend, CompiledCPUDecode)
    cache = KVCache(model.cfg, 1, 32, torch.bfloat16, "cpu")
    with torch.inference_mode():
        prefill(model, prompt, cache)
        if not eager:
            assert build_decode_plan(model) is not None  # every layer has a record: no eager fallback
        return torch.stack([decode_step(model, torch.tensor([t]), cache).float() for t in tokens])
