"""Profiler statistics, the neuron file format and its failure modes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

import partinfer.common.neuron_file as neuron_file_module
from partinfer.common.data import load_texts
from partinfer.common.neuron_file import NeuronFile, merge
from partinfer.profiler.profile import ProfileConfig, profile_prompts
from partinfer.common.errors import PartinferError
from partinfer.runtime.loader import load_dense_model
from partinfer.runtime.config import ModelConfig
from partinfer.runtime.selection import token_core_mask

PROMPTS = [[5, 17, 33, 9, 60, 11, 7], [44, 21, 3], [90, 12, 13, 14, 15, 100, 101, 102, 103, 4, 8]]
GEN = 5


def brute_force(model_dir, prompts, gen) -> dict[int, torch.Tensor]:
    """Every activation (input of down_proj) per layer, stored with transformers hooks: [tokens, n]."""
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    current: dict[int, torch.Tensor] = {}  # the latest forward's activations per layer
    stored: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, inp, i=i: current.__setitem__(i, inp[0][0]))
             for i, layer in enumerate(ref.model.layers)]
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            full = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen, min_new_tokens=gen,
                                do_sample=False, pad_token_id=0, use_cache=False) if gen else ids
            ref(full)  # one forward over prompt + generated tokens
            for i, a in current.items():
                stored.setdefault(i, []).append(a)
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in stored.items()}


def test_statistics_equal_brute_force(tiny_llama_dir):
    cfg = ProfileConfig(num_samples=3, gen_tokens=GEN, batch_size=2, token_sparsity=0.25)
    model = load_dense_model(tiny_llama_dir, dtype=torch.float32)
    stats = profile_prompts(model, PROMPTS, cfg)
    acts = brute_force(tiny_llama_dir, PROMPTS, GEN)
    total = sum(len(p) + GEN for p in PROMPTS)
    assert stats.tokens == total
    for layer, a in acts.items():
        assert a.shape[0] == total
        torch.testing.assert_close(stats.sum_abs[layer].float(), a.abs().sum(0), rtol=1e-4, atol=1e-4)
        expected_core = token_core_mask(a, 0.25, "abs").sum(0).double()
        assert (stats.core_count[layer] - expected_core).abs().sum() <= 2  # a near-tie may flip across batching
        assert stats.core_count[layer].sum() == total * round(0.25 * a.shape[1])


def make_file(cfg: ModelConfig, seed: int = 0, tokens: int = 100, name: str = "d") -> NeuronFile:
    g = torch.Generator().manual_seed(seed)
    return NeuronFile(
        sum_abs=[torch.rand(cfg.ffn_dim, generator=g, dtype=torch.float64) * tokens for _ in range(cfg.n_layers)],
        core_count=[torch.randint(0, tokens, (cfg.ffn_dim,), generator=g).double() for _ in range(cfg.n_layers)],
        tokens=tokens, model="tiny", fingerprint=cfg.fingerprint, level="dataset", datasets=(name,), sequences=4,
        gen_tokens=GEN, token_sparsity=0.2, core_score="abs",
    )


def test_round_trip_exact(tiny_llama_dir, tmp_path):
    cfg = ModelConfig.from_dir(tiny_llama_dir)
    nf = make_file(cfg)
    back = NeuronFile.load(nf.save(tmp_path / "n.safetensors"), cfg.fingerprint)
    for i in range(cfg.n_layers):
        assert torch.equal(back.sum_abs[i], nf.sum_abs[i]) and torch.equal(back.core_count[i], nf.core_count[i])
        assert torch.equal(back.rank(i), nf.rank(i))
        assert torch.equal(back.rank(i).long(), torch.argsort(nf.mean_abs(i), descending=True, stable=True))
    assert (back.tokens, back.datasets, back.level, back.created) == (nf.tokens, nf.datasets, nf.level, nf.created)


def test_merge_is_exact(tiny_llama_dir):
    cfg = ModelConfig.from_dir(tiny_llama_dir)
    a, b = make_file(cfg, 0, 100, "a"), make_file(cfg, 1, 50, "b")
    m = merge([a, b])
    assert m.tokens == 150 and m.level == "model" and m.datasets == ("a", "b")
    torch.testing.assert_close(m.mean_abs(0), ((a.sum_abs[0] + b.sum_abs[0]) / 150).float())


def test_file_of_another_model_is_refused(tiny_llama_dir, tmp_path):
    cfg = ModelConfig.from_dir(tiny_llama_dir)
    other = replace(cfg, ffn_dim=cfg.ffn_dim * 2)
    path = make_file(other).save(tmp_path / "other.safetensors")
    with pytest.raises(PartinferError, match="was made for"):
        NeuronFile.load(path, cfg.fingerprint)


def test_truncated_and_missing_files(tiny_llama_dir, tmp_path):
    cfg = ModelConfig.from_dir(tiny_llama_dir)
    path = make_file(cfg).save(tmp_path / "n.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PartinferError, match="truncated or corrupt"):
        NeuronFile.load(path)
    with pytest.raises(PartinferError, match="does not exist"):
        NeuronFile.load(tmp_path / "missing.safetensors")


def test_unknown_version_is_refused(tiny_llama_dir, tmp_path, monkeypatch):
    cfg = ModelConfig.from_dir(tiny_llama_dir)
    monkeypatch.setattr(neuron_file_module, "VERSION", 99)
    path = make_file(cfg).save(tmp_path / "future.safetensors")
    monkeypatch.setattr(neuron_file_module, "VERSION", 1)
    with pytest.raises(PartinferError, match="version 99"):
        NeuronFile.load(path)


def test_interrupted_write_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    cfg = ModelConfig.from_dir(tiny_llama_dir)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(neuron_file_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        make_file(cfg).save(tmp_path / "n.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_empty_dataset_and_unknown_task(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(PartinferError, match="no non-empty texts"):
        load_texts(str(empty))
    with pytest.raises(PartinferError, match="unknown task 'no_such_task_xyz'"):
        load_texts("no_such_task_xyz")


def test_profiled_files_rank_by_contribution_and_keep_it_through_save_and_merge(tiny_llama_dir, tmp_path):
    """mean |a_i| · ‖down_i‖: the down norms are the model's, stored with the file, kept by a merge."""
    from partinfer.common.neuron_file import merge
    from partinfer.profiler.profile import with_down_norms
    from partinfer.runtime.checkpoint import CheckpointReader

    cfg = ModelConfig.from_dir(tiny_llama_dir)
    plain = make_file(cfg)
    ranked = with_down_norms(plain, tiny_llama_dir)
    with CheckpointReader(tiny_llama_dir) as reader:
        down = [reader.get(f"model.layers.{i}.mlp.down_proj.weight").float() for i in range(cfg.n_layers)]
    back = NeuronFile.load(ranked.save(tmp_path / "c.safetensors"), cfg.fingerprint)
    assert plain.rank_by == "mean_abs" and back.rank_by == "contribution"
    for i in range(cfg.n_layers):
        expected = torch.argsort(plain.mean_abs(i) * down[i].norm(dim=0), descending=True, stable=True)
        assert torch.equal(back.rank(i).long(), expected)
        assert not torch.equal(back.rank(i), plain.rank(i))  # random weights: the norms reorder the neurons
    merged = merge([back, with_down_norms(make_file(cfg, seed=1), tiny_llama_dir)])
    assert merged.rank_by == "contribution"
    assert merge([back, make_file(cfg, seed=1)]).rank_by == "mean_abs"  # one file without norms: no norms


def test_the_contribution_command_writes_a_ranked_copy(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from partinfer.cli.app import app

    cfg = ModelConfig.from_dir(tiny_llama_dir)
    source = make_file(cfg).save(tmp_path / "plain.safetensors")
    before = source.read_bytes()
    done = CliRunner().invoke(app, ["neurons", "contribution", str(source), "-m", str(tiny_llama_dir),
                                    "-o", str(tmp_path / "ranked.safetensors")])
    assert done.exit_code == 0, done.output
    assert NeuronFile.load(tmp_path / "ranked.safetensors").rank_by == "contribution" and source.read_bytes() == before
    again = CliRunner().invoke(app, ["neurons", "contribution", str(source), "-m", str(tiny_llama_dir),
                                     "-o", str(source)])
    assert again.exit_code == 2 and source.read_bytes() == before  # never over a file it did not make
