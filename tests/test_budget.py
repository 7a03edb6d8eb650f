"""`--budget profiled`: the uniform total of loaded and computed neurons, spread by layer."""

from __future__ import annotations

import pytest
import torch

from common.errors import PartinferError
from runtime.generate import generate
from runtime.loader import load_model
from runtime.model import ModelConfig
from runtime.sparsity import SparsityConfig, fraction_count, layer_budgets, plan_layers
from tests.helpers import make_neuron_file, tiny_prompts


def test_a_flat_layer_gets_more_neurons_than_a_peaked_one():
    n = 64
    flat = torch.ones(n)
    peaked = torch.cat([torch.full((4,), 100.0), torch.full((n - 4,), 0.1)])
    k, n_base = 32, 8
    budgets = layer_budgets([flat, peaked], k, n_base)
    assert sum(budgets) == 2 * k and min(budgets) >= n_base
    assert budgets[0] > budgets[1]
    assert layer_budgets([flat, flat], k, n_base) == [k, k]  # equal layers: the uniform split


@pytest.fixture(scope="module")
def neurons(tiny_llama_dir, tmp_path_factory):
    return make_neuron_file(tiny_llama_dir, tmp_path_factory.mktemp("budget") / "model.safetensors")


@pytest.mark.parametrize("method", ["load-only", "static", "partinfer", "tokenwise"])
def test_profiled_budget_spends_the_uniform_total(tiny_llama_dir, neurons, method):
    cfg = ModelConfig.from_dir(tiny_llama_dir)
    base = SparsityConfig(method=method, gamma=0.6, delta=0.2, phi=0.4, model_neurons=neurons, start_num=0, end_num=3)
    uniform = plan_layers(base, cfg)
    profiled = plan_layers(SparsityConfig(**{**base.to_dict(), "budget": "profiled", "model_neurons": neurons}), cfg)
    n_base = fraction_count(0.2, cfg.ffn_dim)
    assert sum(p.loaded.shape[0] for p in profiled.values()) == sum(p.loaded.shape[0] for p in uniform.values())
    total_active = sum(p.n_active for p in uniform.values())
    assert abs(sum(p.n_active for p in profiled.values()) - total_active) <= len(uniform)  # ±1 neuron per layer
    for plan in profiled.values():
        assert n_base <= plan.loaded.shape[0] <= cfg.ffn_dim and plan.n_active <= plan.loaded.shape[0]
        assert plan.loaded.unique().shape[0] == plan.loaded.shape[0]
    assert [p.loaded.shape[0] for p in profiled.values()] != [p.loaded.shape[0] for p in uniform.values()]
    model = load_model(tiny_llama_dir, torch.float32, "cpu", SparsityConfig(**{**base.to_dict(), "budget": "profiled",
                                                                                "model_neurons": neurons}))
    assert len(generate(model, tiny_prompts(2, seed=1), 6).tokens[0]) == 6


def test_unknown_budget_is_a_one_line_error():
    with pytest.raises(PartinferError, match="--budget must be one of"):
        SparsityConfig(budget="greedy")
