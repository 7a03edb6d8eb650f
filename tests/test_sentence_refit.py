"""The per-sentence refit (`--refit-tokens`): the kernel-form ridge solve equals the primal one, the
prompt's last tokens are kept across chunks, the map is fitted to what the loaded but inactive neurons
add, the compiled decode adds it as the eager path does, and misuse is a one-line error."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from partinfer.cli.app import app
from partinfer.common.errors import PartinferError
from partinfer.runtime.loader import load_model
from partinfer.runtime.model import KVCache, prefill
from partinfer.runtime.sentence_refit import RIDGE, PromptInputs, fit_sentence_map
from partinfer.runtime.sparse_ffn import SparseFFN
from partinfer.runtime.sparsity import SparsityConfig
from tests.helpers import bf16_decode_steps
from tests.test_cli import assert_clean_error

PROMPT = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3, 250, 11, 64, 800, 23, 4]])


def test_the_kernel_form_equals_the_primal_ridge_solution():
    g = torch.Generator().manual_seed(0)
    x, u, new = torch.randn(12, 40, generator=g), torch.randn(12, 40, generator=g), torch.randn(3, 40, generator=g)
    inputs, outputs = fit_sentence_map(x, u, torch.float64)
    got = (new.double() @ inputs.t()) @ outputs.t()  # what the layer adds: linear(linear(x, X), Aᵀ)
    xd = x.double()
    ridge = RIDGE * (xd * xd).sum(1).mean()
    primal = torch.linalg.solve(xd.t() @ xd + ridge * torch.eye(40, dtype=torch.float64), xd.t() @ u.double())  # [d, d]
    assert torch.allclose(got, new.double() @ primal, atol=1e-10)


def test_prompt_inputs_keep_the_last_tokens_across_chunks():
    kept = PromptInputs(5, 2, torch.float32, torch.device("cpu"))
    rows = torch.arange(16.0).view(8, 2)
    kept.add(rows[:3])
    assert torch.equal(kept.tokens(), rows[:3])
    kept.add(rows[3:4])
    kept.add(rows[4:7])  # 7 tokens in all: the first two fall out
    assert torch.equal(kept.tokens(), rows[2:7])
    kept.add(rows)  # a chunk longer than the buffer: its own last five
    assert torch.equal(kept.tokens(), rows[3:8])


def _sparsity(neurons, **kw) -> SparsityConfig:
    return SparsityConfig(**{"method": "partinfer", "gamma": 0.6, "delta": 0.2, "phi": 0.4, "model_neurons": neurons,
                             "start_num": 1, "end_num": 2, **kw})


@pytest.mark.parametrize("weights", [None, "int8"])
def test_the_map_is_fitted_to_what_the_sentence_leaves_out(tiny_with_tokenizer, weights):
    """On float rows and on compact ones (`CompactSparseFFN`: its own tail product)."""
    model_dir, neurons = tiny_with_tokenizer / "model", tiny_with_tokenizer / "neurons.safetensors"
    model = load_model(model_dir, torch.float32, "cpu", _sparsity(neurons, refit_tokens=8), weights)
    layers = [b.mlp for b in model.layers if isinstance(b.mlp, SparseFFN)]
    assert all((type(m).__name__ == "CompactSparseFFN") == (weights is not None) for m in layers)
    inputs = {id(m): [] for m in layers}
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs[id(m)].append(args[0][0])) for m in layers]
    with torch.inference_mode():
        prefill(model, PROMPT, KVCache(model.cfg, 1, 32, torch.float32, "cpu"))
    for h in hooks:
        h.remove()
    assert layers
    for m in layers:
        x = torch.cat(inputs[id(m)])[-8:]  # [8, D]: the prompt's last eight tokens
        got_x, a_t = m.sentence_map
        assert torch.equal(got_x, x)
        with torch.inference_mode():  # independently: all loaded neurons less the active prefix, on the same inputs
            left_out = m._down_of(m._activations(x[None], m.n_loaded))[0] - m._down_of(m._activations(x[None], m.n_active))[0]
        assert left_out.abs().max() > 0
        fitted = (x @ x.t()) @ a_t.t()  # what the map adds for the prompt's own tokens
        assert (fitted - left_out).norm() < 0.9 * left_out.norm()
        assert torch.allclose(fitted, (x @ x.t()) @ fit_sentence_map(x, left_out, torch.float32)[1].t(), atol=1e-4)
    # a new prompt is a new sentence: its map replaces the last one
    with torch.inference_mode():
        prefill(model, PROMPT[:, :5], KVCache(model.cfg, 1, 32, torch.float32, "cpu"))
    assert all(m.sentence_map[0].shape[0] == 5 for m in layers)


def test_compiled_decode_adds_the_refit_as_eager_does(tiny_with_tokenizer):
    from partinfer.runtime.native import cpu_kernels

    if not cpu_kernels():
        pytest.skip("no compiled CPU kernels on this machine")
    model_dir, neurons = tiny_with_tokenizer / "model", tiny_with_tokenizer / "neurons.safetensors"

    def steps(sparsity, eager):
        return bf16_decode_steps(model_dir, sparsity, PROMPT, eager)

    with_map = _sparsity(neurons, refit_tokens=16)
    compiled, eager = steps(with_map, False), steps(with_map, True)
    without = steps(_sparsity(neurons), False)
    assert (compiled - eager).abs().max() < 0.05 * eager.abs().max()
    assert (compiled - without).abs().max() > 4 * (compiled - eager).abs().max()


def test_misuse_is_a_one_line_error(tiny_with_tokenizer):
    with pytest.raises(PartinferError, match="not tokenwise"):
        SparsityConfig(method="tokenwise", refit_tokens=8)
    with pytest.raises(PartinferError, match="refit-tokens"):
        SparsityConfig(method="partinfer", refit_tokens=-1)
    result = CliRunner().invoke(app, ["generate", "-m", str(tiny_with_tokenizer / "model"), "-p", "hi", "-n", "2",
                                      "--method", "tokenwise", "--refit-tokens", "8"])
    assert_clean_error(result, "not tokenwise")
