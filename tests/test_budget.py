"""`--budget profiled`: the uniform total of loaded and computed neurons, spread by layer by each layer's
measured sensitivity (stored in the neuron file by `partinfer neurons sensitivity`)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from partinfer.cli.app import app
from partinfer.common.errors import PartinferError
from partinfer.common.neuron_file import LayerSensitivity, NeuronFile, merge
from partinfer.profiler.sensitivity import TruncatedFFN, measure_sensitivity
from partinfer.runtime.generate import generate
from partinfer.runtime.kernels import linear
from partinfer.runtime.loader import load_dense_model, load_model
from partinfer.runtime.config import ModelConfig
from partinfer.runtime.sparsity import BUDGET_DAMPING, SparsityConfig, fraction_count, layer_budgets, plan_layers
from tests.helpers import make_neuron_file, tiny_prompts


def test_a_more_sensitive_layer_gets_more_neurons_and_the_total_is_kept():
    n, k, n_base = 64, 32, 8
    flat = torch.ones(n)
    budgets = layer_budgets([flat, flat, flat], [2.0, 1.0, 1.0], k, n_base)
    assert sum(budgets) == 3 * k and min(budgets) >= n_base and max(budgets) <= n
    assert budgets[0] > k > budgets[1] and budgets[1] == budgets[2]
    assert layer_budgets([flat, flat], [1.0, 1.0], k, n_base) == [k, k]  # equal layers: the uniform split


def test_the_budget_moves_only_part_of_the_way_to_the_undamped_optimum():
    n, k, n_base = 64, 32, 8
    flat = torch.ones(n)
    # so much more sensitive that undamped, layer 0 takes every neuron above layer 1's base
    budgets = layer_budgets([flat, flat], [1e6, 1e-6], k, n_base)
    moved = round(BUDGET_DAMPING * (k - n_base))
    assert budgets == [k + moved, k - moved]


@pytest.fixture(scope="module")
def neurons(tiny_llama_dir, tmp_path_factory):
    """A neuron file with sensitivities measured at γ 0.6 on the tiny model."""
    path = make_neuron_file(tiny_llama_dir, tmp_path_factory.mktemp("budget") / "model.safetensors")
    model = load_dense_model(tiny_llama_dir, dtype=torch.float32)
    nf = NeuronFile.load(path)
    sens = measure_sensitivity(model, nf, tiny_prompts(4, seed=3), 0.6, progress=False)
    return replace(nf, sensitivity=sens).save(path.with_name("sensitive.safetensors"))


def test_sensitivity_round_trips_and_a_merge_drops_it(neurons):
    nf = NeuronFile.load(neurons)
    assert nf.sensitivity is not None and nf.sensitivity.gamma == 0.6
    assert set(nf.sensitivity.kl) == set(range(nf.n_layers)) and all(v > 0 for v in nf.sensitivity.kl.values())
    again = NeuronFile.load(nf.save(neurons.with_name("again.safetensors")))
    assert again.sensitivity == nf.sensitivity
    assert merge([nf, nf]).sensitivity is None


def test_truncated_ffn_equals_the_dense_ffn_with_the_other_neurons_zeroed(tiny_llama_dir):
    model = load_dense_model(tiny_llama_dir, dtype=torch.float32)
    ffn = model.layers[1].mlp
    loaded = torch.tensor([5, 0, 17, 3])
    x = torch.randn(2, 3, model.cfg.dim)
    a = ffn.activations(x)
    keep = torch.zeros(model.cfg.ffn_dim)
    keep[loaded] = 1
    torch.testing.assert_close(TruncatedFFN(ffn, loaded)(x), linear(a * keep, ffn.down), rtol=1e-5, atol=1e-6)


def test_with_every_neuron_kept_the_sensitivity_is_zero(tiny_llama_dir, neurons):
    model = load_dense_model(tiny_llama_dir, dtype=torch.float32)
    sens = measure_sensitivity(model, NeuronFile.load(neurons), tiny_prompts(2, seed=5), 1.0, progress=False)
    assert max(sens.kl.values()) < 1e-6


@pytest.mark.parametrize("method", ["load-only", "static", "partinfer", "tokenwise"])
def test_profiled_budget_spends_the_uniform_total(tiny_llama_dir, neurons, method):
    cfg = ModelConfig.from_dir(tiny_llama_dir)
    base = SparsityConfig(method=method, gamma=0.6, delta=0.2, phi=0.4, model_neurons=neurons, start_num=0, end_num=3)
    uniform = plan_layers(base, cfg)
    profiled = plan_layers(replace(base, budget="profiled"), cfg)
    n_base = fraction_count(0.2, cfg.ffn_dim)
    assert sum(p.loaded.shape[0] for p in profiled.values()) == sum(p.loaded.shape[0] for p in uniform.values())
    total_active = sum(p.n_active for p in uniform.values())
    assert abs(sum(p.n_active for p in profiled.values()) - total_active) <= len(uniform)  # ±1 neuron per layer
    for plan in profiled.values():
        assert n_base <= plan.loaded.shape[0] <= cfg.ffn_dim and plan.n_active <= plan.loaded.shape[0]
        assert plan.loaded.unique().shape[0] == plan.loaded.shape[0]
    assert [p.loaded.shape[0] for p in profiled.values()] != [p.loaded.shape[0] for p in uniform.values()]
    model = load_model(tiny_llama_dir, torch.float32, "cpu", replace(base, budget="profiled"))
    assert len(generate(model, tiny_prompts(2, seed=1), 6).tokens[0]) == 6


def test_a_file_without_sensitivities_or_for_another_gamma_is_a_one_line_error(tiny_llama_dir, neurons, tmp_path):
    cfg = ModelConfig.from_dir(tiny_llama_dir)
    plain = make_neuron_file(tiny_llama_dir, tmp_path / "plain.safetensors")
    with pytest.raises(PartinferError, match="needs layer sensitivities.*partinfer neurons sensitivity"):
        plan_layers(SparsityConfig(method="load-only", gamma=0.6, budget="profiled", model_neurons=plain), cfg)
    with pytest.raises(PartinferError, match="for --gamma 0.6, not 0.5"):
        plan_layers(SparsityConfig(method="load-only", gamma=0.5, budget="profiled", model_neurons=neurons), cfg)


def test_a_corrupt_sensitivity_is_a_one_line_error(neurons, tmp_path):
    nf = NeuronFile.load(neurons)
    bad = replace(nf, sensitivity=LayerSensitivity(0.6, {0: float("nan")}, 1, 1)).save(tmp_path / "bad.safetensors")
    with pytest.raises(PartinferError, match="not a valid neuron file.*sensitivity of layer 0"):
        NeuronFile.load(bad)


def test_the_command_writes_a_copy_with_sensitivities(tiny_with_tokenizer, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(4)))
    source = tiny_with_tokenizer / "neurons.safetensors"
    before = source.read_bytes()
    out = tmp_path / "with-sensitivity.safetensors"
    args = ["neurons", "sensitivity", str(source), "--out", str(out), "--gamma", "0.5", "-d", str(prompts),
            "--model", str(tiny_with_tokenizer / "model")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert source.read_bytes() == before  # the input is never touched
    sens = NeuronFile.load(out).sensitivity
    assert sens is not None and sens.gamma == 0.5 and sens.texts == 4
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "exists" in again.output


def test_sensitivity_of_a_sparse_or_compact_model_is_a_one_line_error(tiny_llama_dir, neurons):
    sparse = load_model(tiny_llama_dir, torch.float32, "cpu",
                        SparsityConfig(method="load-only", gamma=0.6, model_neurons=neurons, start_num=0, end_num=3))
    with pytest.raises(PartinferError, match="measuring sensitivity reads every neuron of a plain checkpoint"):
        measure_sensitivity(sparse, NeuronFile.load(neurons), tiny_prompts(1), 0.6, progress=False)
