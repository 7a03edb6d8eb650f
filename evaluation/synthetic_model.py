"""Random-weight Llama models of a real model's shape, for speed benchmarks where its weights cannot go.

Why: decode speed depends on the shapes and the bytes read, not on the weights' values, and a GPU
machine may have no network to fetch (or room to copy) a real 8B checkpoint. `save_random_llama`
writes a Hugging Face directory (config.json + safetensors) that every part of partinfer and
transformers loads like a real one; `profile_random_model` gives it a neuron file from the real
profiler on random prompts, so the sparse methods run too (which neurons they keep does not change
their speed, only how many).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from partinfer.profiler.profile import ProfileConfig, profile_prompts, to_neuron_file
from partinfer.common.atomic import atomic_file
from partinfer.runtime.loader import load_dense_model

# Hugging Face LlamaConfig fields per shape. llama-3.1-8b: the published Llama-3.1-8B geometry.
SHAPES: dict[str, dict] = {
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "tiny": dict(  # for tests: the same code path in seconds
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    ),
}


def llama_tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes of a Llama model with config fields `c`."""
    d, n, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (n, d), p + "mlp.up_proj.weight": (n, d), p + "mlp.down_proj.weight": (d, n),
        }
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], d)
    return shapes


def save_random_llama(out: Path, shape: str = "llama-3.1-8b", device: str = "cpu", seed: int = 0) -> Path:
    """Write a bf16 Llama of `shape` with random weights (N(0, 0.02), norms 1) into `out`, one safetensors
    file per layer; returns `out`. Reuses a complete earlier write (config.json is written last)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    out = Path(out)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, **SHAPES[shape]}
    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text()) == config:
        return out
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = llama_tensor_shapes(config)
    groups: dict[str, list[str]] = {}  # file -> tensor names: a layer per file keeps host memory small
    for name in shapes:
        layer = name.split(".")[2] if name.startswith("model.layers.") else "other"
        groups.setdefault(f"model-{layer}.safetensors", []).append(name)
    weight_map = {}
    for file, names in tqdm(groups.items(), desc="random weights", unit="file"):
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                w = torch.randn(shapes[name], generator=g, device=device, dtype=torch.float32).mul_(0.02)
                tensors[name] = w.to(torch.bfloat16).cpu()
        with atomic_file(out / file) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        weight_map |= {name: file for name in names}
    with atomic_file(out / "model.safetensors.index.json") as tmp:
        tmp.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    with atomic_file(out / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=1))
    return out


def profile_random_model(model_dir: Path, path: Path, device: str = "cpu", prompts: int = 8, prompt_len: int = 64,
                         gen_tokens: int = 8, seed: int = 0) -> Path:
    """Profile a model on random token prompts with the real profiler and save a model-level neuron file."""
    model = load_dense_model(Path(model_dir), torch.bfloat16, device)
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    token_prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(prompts)]
    cfg = ProfileConfig(num_samples=prompts, gen_tokens=gen_tokens, batch_size=min(prompts, 8))
    stats = profile_prompts(model, token_prompts, cfg)
    return to_neuron_file(stats, model, Path(model_dir).name, "random-prompts", prompts, cfg, level="model").save(path)
