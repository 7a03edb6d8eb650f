"""The compiled CPU decode kernels (runtime/native.py) against fp32 references of the same bf16 weights."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from runtime.kernels import linear, uses_native_gemv
from runtime.loader import load_model
from runtime.model import KVCache, decode_step, prefill
from runtime.native import _cpu_has_avx2_fma, cpu_kernels, gemv, gemv_t
from runtime.sparse_ffn import begin_prompt, end_prompt, sparse_modules
from runtime.sparsity import SparsityConfig, fraction_count
from tests.helpers import make_neuron_file

pytestmark = pytest.mark.skipif(
    not _cpu_has_avx2_fma() or shutil.which("g++") is None, reason="needs an x86 CPU with AVX2+FMA and g++")


def test_kernels_build_on_this_machine():
    assert cpu_kernels(), "g++ and AVX2 are here, so the kernels must build (see the message above)"


@pytest.mark.parametrize("n_rows,k", [(96, 64), (37, 83), (5, 576)])  # tails: rows not /4, columns not /16
def test_gemv_and_gemv_t_match_fp32_reference(n_rows, k):
    g = torch.Generator().manual_seed(n_rows)
    W = torch.randn(n_rows, k, generator=g).bfloat16()
    x, Wf = torch.randn(k, generator=g), W.float()
    torch.testing.assert_close(gemv(W, x), Wf @ x, rtol=1e-4, atol=1e-4)
    xb = x.bfloat16()  # bf16 in, bf16 out (accumulated in fp32, rounded once)
    assert gemv(W, xb).dtype == torch.bfloat16
    torch.testing.assert_close(gemv(W, xb), (Wf @ xb.float()).bfloat16())
    rows = torch.randperm(n_rows, generator=g)[: max(1, n_rows // 3)]
    torch.testing.assert_close(gemv(W, x, rows), Wf[rows] @ x, rtol=1e-4, atol=1e-4)
    a = torch.randn(rows.numel(), generator=g)
    torch.testing.assert_close(gemv_t(W, a, rows), a @ Wf[rows], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gemv_t(W, torch.ones(n_rows)), Wf.sum(0), rtol=1e-4, atol=1e-4)


def test_linear_takes_the_kernel_for_one_bf16_token_only():
    W, bias = torch.randn(48, 32).bfloat16(), torch.randn(48).bfloat16()
    x = torch.randn(1, 1, 32).bfloat16()
    assert uses_native_gemv(x, W) and not uses_native_gemv(torch.randn(1, 2, 32).bfloat16(), W)
    assert not uses_native_gemv(x.float(), W.float())
    y = linear(x, W, bias)
    assert y.shape == (1, 1, 48) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(x.float(), W.float(), bias.float()), rtol=1e-2, atol=1e-2)


def test_prefill_upcasts_bf16_only_without_bf16_instructions(monkeypatch):
    """Many bf16 tokens compute in fp32 on AVX2-only CPUs and stay bf16 where the CPU has bf16 math."""
    import runtime.kernels
    from runtime.kernels import cpu_prefers_fp32

    W, prompt, token = torch.randn(48, 32).bfloat16(), torch.randn(1, 64, 32).bfloat16(), torch.randn(1, 1, 32).bfloat16()
    monkeypatch.setattr(runtime.kernels, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert cpu_prefers_fp32(prompt, W) and not cpu_prefers_fp32(token, W)
    monkeypatch.setattr(runtime.kernels, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512_bf16"}))
    assert not cpu_prefers_fp32(prompt, W) and cpu_prefers_fp32(prompt, W.half())


def test_tokenwise_decode_with_kernels(tiny_llama_dir, tmp_path):
    """bf16 token-wise decode: round(φn) neurons with the base among them, and the layer's output
    equals a dense fp32 computation restricted to the chosen neurons."""
    neurons = make_neuron_file(tiny_llama_dir, tmp_path / "model.safetensors")
    model = load_model(tiny_llama_dir, torch.bfloat16, "cpu",
                       SparsityConfig(method="tokenwise", gamma=0.7, delta=0.3, phi=0.4, model_neurons=neurons))
    layer = sparse_modules(model)[0]
    layer.end_prompt()
    x = torch.randn(1, 1, model.cfg.dim).bfloat16()
    y = layer(x)
    chosen = layer.last_selected[0, 0]
    n = model.cfg.ffn_dim
    assert chosen.numel() == fraction_count(0.4, n) and chosen.unique().numel() == chosen.numel()
    assert set(range(fraction_count(0.3, n))) <= set(chosen.tolist())
    xf = x.float().view(-1)
    a = F.silu(layer.gate.float()[chosen] @ xf) * (layer.up.float()[chosen] @ xf)
    torch.testing.assert_close(y.float().view(-1), a @ layer.down_t.float()[chosen], rtol=2e-2, atol=2e-2)


def decode_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), V] of one-token decode steps after a prefill of `prompt`."""
    cache = KVCache(model.cfg, 1, len(prompt) + len(tokens), model.embed_tokens.weight.dtype, "cpu")
    with torch.inference_mode():
        begin_prompt(model)
        prefill(model, torch.tensor([prompt]), cache)
        end_prompt(model)
        return torch.stack([decode_step(model, torch.tensor([t]), cache)[0].float() for t in tokens])


@pytest.mark.parametrize("method", ["dense", "partinfer", "tokenwise"])
def test_compiled_decode_as_accurate_as_eager_bf16(tiny_llama_dir, tmp_path, monkeypatch, method):
    """Decode layers as compiled ops (whole layers; attention only for token-wise): logits stay as close
    to an fp32 run of the same bf16 weights as the eager bf16 ops are."""
    import runtime.model

    neurons = make_neuron_file(tiny_llama_dir, tmp_path / "model.safetensors")
    sparsity = SparsityConfig(method=method, gamma=0.7, delta=0.3, phi=0.4, model_neurons=neurons)
    prompt, tokens = [5, 17, 99, 3, 42, 7], [11, 23, 8, 64, 2, 31]
    fused = decode_logits(load_model(tiny_llama_dir, torch.bfloat16, "cpu", sparsity), prompt, tokens)
    reference_model = load_model(tiny_llama_dir, torch.bfloat16, "cpu", sparsity).float()
    reference = decode_logits(reference_model, prompt, tokens)
    monkeypatch.setattr(runtime.model, "cpu_kernels", lambda: False)  # the eager ops
    eager = decode_logits(load_model(tiny_llama_dir, torch.bfloat16, "cpu", sparsity), prompt, tokens)
    fused_err, eager_err = (fused - reference).abs().max(), (eager - reference).abs().max()
    assert fused_err <= 2 * eager_err + 1e-2, (fused_err, eager_err)


def test_argmax_matches_torch():
    """The greedy sampler's compiled argmax: first maximum on ties, NaN first, fp32 and bf16 rows."""
    from runtime.native import argmax

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1003, generator=g)  # not a multiple of the 8-wide vector
    x[1, 10] = x[1, 500] = x[1].max() + 1  # a tie: the first wins
    x[2, 7] = x[2, 900] = float("nan")
    x[3, 1002] = 50.0  # in the scalar tail
    for t in (x, x.bfloat16()):
        assert torch.equal(argmax(t), t.argmax(dim=-1))


def test_kept_decode_arguments_follow_a_new_prompt(tiny_llama_dir, tmp_path):
    """The model keeps model_decode's argument lists between tokens (DecodePlan). A new prompt gives the
    token-wise layers a new score scale, which must reach them: decoding after a second prompt equals
    decoding it on a freshly loaded model."""
    neurons = make_neuron_file(tiny_llama_dir, tmp_path / "model.safetensors")
    sparsity = SparsityConfig(method="tokenwise", gamma=0.7, delta=0.3, phi=0.4, model_neurons=neurons, start_num=0,
                              end_num=3)
    first, second, tokens = [5, 17, 99, 3, 42, 7], [90, 1, 30, 77, 64, 60, 9], [11, 23, 8, 64, 2, 31]
    reused = load_model(tiny_llama_dir, torch.bfloat16, "cpu", sparsity)
    decode_logits(reused, first, tokens)
    plan = reused.decode_plan
    again = decode_logits(reused, second, tokens)
    assert plan is not None and reused.decode_plan is not plan
    fresh = decode_logits(load_model(tiny_llama_dir, torch.bfloat16, "cpu", sparsity), second, tokens)
    assert torch.equal(again, fresh)


def test_kept_partinfer_arguments_are_the_live_active_prefix(tiny_llama_dir, tmp_path):
    """PartInfer moves each prompt's active set to the front of its weights in place, so a kept plan
    stays valid only while its views alias that storage: check they do after a second prompt."""
    neurons = make_neuron_file(tiny_llama_dir, tmp_path / "model.safetensors")
    sparsity = SparsityConfig(method="partinfer", gamma=0.7, delta=0.3, phi=0.4, model_neurons=neurons, start_num=0,
                              end_num=3)
    model = load_model(tiny_llama_dir, torch.bfloat16, "cpu", sparsity)
    decode_logits(model, [5, 17, 99, 3, 42, 7], [11, 23])
    decode_logits(model, [90, 1, 30, 77, 64, 60, 9], [11, 23])
    for layer, w1, w2 in zip(model.layers, model.decode_plan.w1, model.decode_plan.w2):
        m = layer.mlp.n_active
        assert w1.data_ptr() == layer.mlp.gate_up.data_ptr() and torch.equal(w1, layer.mlp.gate_up[:m].view(2 * m, -1))
        assert w2 is layer.mlp.down_head


@pytest.mark.parametrize("method", ["dense", "partinfer", "tokenwise"])
def test_compiled_decode_same_for_any_team_size(tiny_llama_dir, tmp_path, method):
    """model_decode splits every stage over an OpenMP team: 1, 2 or 3 threads give the same logits
    (bit for bit where each output row is one thread's dot product; token-wise adds per-thread partial
    sums, so there only up to rounding)."""
    neurons = make_neuron_file(tiny_llama_dir, tmp_path / "model.safetensors")
    sparsity = SparsityConfig(method=method, gamma=0.7, delta=0.3, phi=0.4, model_neurons=neurons, start_num=0,
                              end_num=3)
    prompt, tokens = [5, 17, 99, 3, 42, 7], [11, 23, 8, 64, 2, 31]
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(decode_logits(load_model(tiny_llama_dir, torch.bfloat16, "cpu", sparsity), prompt, tokens))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        if method == "tokenwise":
            torch.testing.assert_close(other, runs[0], rtol=2e-2, atol=2e-2)
        else:
            assert torch.equal(other, runs[0])
