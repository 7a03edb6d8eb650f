"""Compensation of unloaded neurons: the fit is the least-squares solution, it is zero when nothing is
unloaded, it round-trips through its file, and a file for another model or budget is refused."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from partinfer.cli.app import app
from partinfer.common.compensation_file import Compensation
from partinfer.common.errors import PartinferError
from partinfer.profiler.compensation import fit_compensation
from partinfer.runtime.engine import load_engine
from partinfer.runtime.generate import generate
from partinfer.runtime.loader import load_model
from partinfer.runtime.model import KVCache, prefill
from partinfer.runtime.sparsity import SparsityConfig, loaded_digest, plan_layers
from tests.helpers import bf16_decode_steps
from tests.test_cli import assert_clean_error

TEXTS = {"calib": [f"Sentence number {i} tells of rivers, mountains, kings and the weights of small models." for i in range(8)]}
runner = CliRunner()


def plans_for(model_dir, neurons, gamma):
    from partinfer.runtime.config import ModelConfig

    return plan_layers(SparsityConfig(method="load-only", gamma=gamma, delta=min(0.3, gamma), phi=gamma,
                                      model_neurons=neurons, start_num=1, end_num=2), ModelConfig.from_dir(model_dir))


def test_fit_equals_a_direct_least_squares_solution(tiny_with_tokenizer):
    model_dir, neurons = tiny_with_tokenizer / "model", tiny_with_tokenizer / "neurons.safetensors"
    engine = load_engine(str(model_dir), "fp32")
    plans = plans_for(model_dir, neurons, 0.7)
    d = engine.model.cfg.dim
    comp = fit_compensation(engine, TEXTS, plans, rank=d, ridge=1e-4)
    # Direct: every token's FFN input X and unloaded contribution U, then lstsq.
    xs = {i: [] for i in plans}
    hooks = [engine.model.layers[i].mlp.register_forward_pre_hook(lambda m, args, i=i: xs[i].append(args[0][0]))
             for i in plans]
    try:
        with torch.inference_mode():
            for text in TEXTS["calib"]:
                ids = torch.tensor([engine.encode(text, chat_template=False)])
                prefill(engine.model, ids, engine.new_cache(1, ids.shape[1]), select=False)
    finally:
        for h in hooks:
            h.remove()
    for i, plan in plans.items():
        ffn = engine.model.layers[i].mlp
        X = torch.cat(xs[i]).double()  # [N, d]
        keep = torch.zeros(ffn.down.shape[1], dtype=torch.bool)
        keep[plan.loaded] = True
        a = ffn.activations(X.float()[None])[0].detach().double()  # [N, n]
        U = a[:, ~keep] @ ffn.down.detach().double()[:, ~keep].T  # [N, d]
        lam = 1e-4 * float(torch.diagonal(X.T @ X).mean())  # the same ridge, on the exact rows
        W = torch.linalg.lstsq(torch.cat([X, lam**0.5 * torch.eye(d, dtype=X.dtype)]),
                               torch.cat([U, torch.zeros(d, d, dtype=U.dtype)])).solution
        assert X.shape[0] == comp.tokens > d
        torch.testing.assert_close((comp.a[i] @ comp.b[i]).double(), W, rtol=1e-3, atol=1e-3 * float(W.abs().max()))
        assert float((X @ W - U).norm() / U.norm()) < 0.5  # the map explains most of what is not loaded


def test_nothing_unloaded_means_no_compensation_and_dense_tokens(tiny_with_tokenizer, tmp_path):
    model_dir, neurons = tiny_with_tokenizer / "model", tiny_with_tokenizer / "neurons.safetensors"
    engine = load_engine(str(model_dir), "fp32")
    comp = fit_compensation(engine, TEXTS, plans_for(model_dir, neurons, 1.0), rank=8)
    assert all(float(comp.a[i].abs().max()) == 0.0 for i in comp.a)
    comp.save(tmp_path / "c.safetensors")
    sparsity = SparsityConfig(method="load-only", gamma=1.0, delta=0.3, phi=1.0, model_neurons=neurons, start_num=1,
                              end_num=2, compensation=tmp_path / "c.safetensors")
    prompts = [engine.encode(t, chat_template=False) for t in TEXTS["calib"][:2]]
    dense = load_model(model_dir, torch.float32, "cpu")
    assert generate(load_model(model_dir, torch.float32, "cpu", sparsity), prompts, 8).tokens == generate(dense, prompts, 8).tokens


def test_round_trip_and_refusals(tiny_with_tokenizer, tmp_path):
    model_dir, neurons = tiny_with_tokenizer / "model", tiny_with_tokenizer / "neurons.safetensors"
    engine = load_engine(str(model_dir), "fp32")
    plans = plans_for(model_dir, neurons, 0.7)
    comp = fit_compensation(engine, TEXTS, plans, rank=4)
    back = Compensation.load(comp.save(tmp_path / "c.safetensors"), engine.model.cfg.fingerprint,
                             loaded_digest(plans, engine.model.cfg.ffn_dim))
    assert back.rank == 4 and back.tokens == comp.tokens and set(back.a) == {1, 2}
    for i in comp.a:
        assert torch.equal(back.a[i], comp.a[i]) and torch.equal(back.b[i], comp.b[i])
    with pytest.raises(PartinferError, match="not this model"):
        Compensation.load(tmp_path / "c.safetensors", "llama-L2-d8-n8-v8")
    other = SparsityConfig(method="load-only", gamma=0.5, delta=0.3, phi=0.5, model_neurons=neurons, start_num=1,
                           end_num=2, compensation=tmp_path / "c.safetensors")
    result = runner.invoke(app, ["generate", "-p", "hi", "--model", str(model_dir), "--dtype", "fp32", "--method",
                                 "load-only", "--gamma", "0.5", "--phi", "0.5", "--start-num", "1", "--end-num", "2",
                                 "--model-neurons", str(neurons), "--compensation", str(tmp_path / "c.safetensors")])
    assert_clean_error(result, "another loaded set")
    assert other.gamma == 0.5


def test_compensation_is_added_and_moves_logits_toward_dense(tiny_with_tokenizer, tmp_path):
    model_dir, neurons = tiny_with_tokenizer / "model", tiny_with_tokenizer / "neurons.safetensors"
    engine = load_engine(str(model_dir), "fp32")
    plans = plans_for(model_dir, neurons, 0.5)
    fit_compensation(engine, TEXTS, plans, rank=64).save(tmp_path / "c.safetensors")
    base = dict(method="load-only", gamma=0.5, delta=0.3, phi=0.5, model_neurons=neurons, start_num=1, end_num=2)
    ids = torch.tensor([engine.encode(TEXTS["calib"][3], chat_template=False)])

    def logits(model):
        with torch.inference_mode():
            return prefill(model, ids, KVCache(model.cfg, 1, ids.shape[1], torch.float32, "cpu"), logits_for="all")

    dense = logits(load_model(model_dir, torch.float32, "cpu"))
    plain = logits(load_model(model_dir, torch.float32, "cpu", SparsityConfig(**base)))
    compensated = logits(load_model(model_dir, torch.float32, "cpu",
                                    SparsityConfig(**base, compensation=tmp_path / "c.safetensors")))
    assert (compensated - dense).abs().mean() < (plain - dense).abs().mean()


@pytest.mark.parametrize("method", ["load-only", "partinfer", "tokenwise"])
def test_compiled_decode_adds_the_compensation_as_eager_does(tiny_with_tokenizer, tmp_path, method):
    """The one-op decode takes the map (no eager fallback): its steps match the eager path's, and differ
    from the same model without the map."""
    from partinfer.runtime.native import cpu_kernels

    if not cpu_kernels():
        pytest.skip("no compiled CPU kernels on this machine")
    model_dir, neurons = tiny_with_tokenizer / "model", tiny_with_tokenizer / "neurons.safetensors"
    plans = plans_for(model_dir, neurons, 0.5)
    fit_compensation(load_engine(str(model_dir), "fp32"), TEXTS, plans, rank=16).save(tmp_path / "c.safetensors")
    base = dict(method=method, gamma=0.5, delta=0.2, phi=0.4 if method != "load-only" else 0.5, model_neurons=neurons,
                start_num=1, end_num=2)
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3]])

    def steps(sparsity, eager):
        return bf16_decode_steps(model_dir, sparsity, ids, eager)

    with_map = SparsityConfig(**base, compensation=tmp_path / "c.safetensors")
    compiled, eager = steps(with_map, False), steps(with_map, True)
    without = steps(SparsityConfig(**base), False)
    assert (compiled - eager).abs().max() < 0.05 * eager.abs().max()
    assert (compiled - without).abs().max() > 4 * (compiled - eager).abs().max()
