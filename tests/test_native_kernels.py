"""The compiled CPU decode kernels (runtime/native.py) against fp32 references of the same bf16 weights."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

import re
from pathlib import Path

from partinfer.runtime.decode import CompiledCPUDecode, EagerDecode
from partinfer.runtime.decode_contract import FfnKind
from partinfer.runtime.loader import load_model
from partinfer.runtime.model import (CompiledRMSNorm, CompiledRope, KVCache, RMSNorm, Rope, decode_step, prefill,
                                     rope_cos_sin)
from partinfer.runtime.native import HEADERS, SOURCE, _cpu_has_avx2_fma, cpu_kernels, gemv, gemv_t
from partinfer.runtime.sparse_ffn import sparse_modules
from partinfer.runtime.sparsity import SparsityConfig, fraction_count
from partinfer.runtime.tokenwise_ffn import TokenwiseFFN
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


@pytest.mark.parametrize("shape", [(1, 64, 576), (2, 3, 83), (1, 1, 1536), (4, 17)])  # widths not /16: the tail
def test_compiled_rms_norm_equals_the_eager_one(shape):
    """The loader's compiled norm rounds as the eager RMSNorm: bf16 equal on random rows of any width,
    threads splitting the rows."""
    assert cpu_kernels()
    g = torch.Generator().manual_seed(shape[-1])
    eager = RMSNorm(shape[-1], 1e-5).bfloat16()
    eager.weight.data = (torch.randn(shape[-1], generator=g) * 0.3 + 1).bfloat16()
    compiled = CompiledRMSNorm(shape[-1], 1e-5)
    compiled.weight = eager.weight
    x = (torch.randn(*shape, generator=g) * 3).bfloat16()
    with torch.inference_mode():
        want, got = eager(x), compiled(x)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        assert (got != want).float().mean() < 0.001  # a partial-sum order may move a scale's last bit
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0)
        strided = torch.cat([x, x], dim=-1)[..., : shape[-1]]  # the same rows, not contiguous
        assert torch.equal(compiled(strided), got)


@pytest.mark.parametrize("batch,cos_batch,tokens", [(1, 1, 64), (2, 2, 5), (3, 1, 1)])
def test_compiled_rope_equals_the_eager_one(batch, cos_batch, tokens):
    """On strided heads (a transposed [B, T, H, hd] view, as the attention makes them), per-sequence or
    shared positions: bit for bit the eager rope."""
    assert cpu_kernels()
    g = torch.Generator().manual_seed(tokens)
    heads = (torch.randn(batch, tokens, 11, 64, generator=g) * 4).bfloat16().transpose(1, 2)  # [B, H, T, hd]
    positions = torch.randint(0, 4096, (cos_batch, tokens), generator=g)
    cos, sin = rope_cos_sin(1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64)), positions, torch.bfloat16)
    with torch.inference_mode():
        want, got = Rope()(heads, cos, sin), CompiledRope()(heads, cos, sin)
    assert got.is_contiguous() and torch.equal(got, want)


def test_the_loader_builds_compiled_norms_and_rope_for_bf16_on_the_cpu(tiny_llama_dir):
    model = load_model(tiny_llama_dir, torch.bfloat16, "cpu")
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(isinstance(m, CompiledRMSNorm) for m in norms)
    assert all(isinstance(b.self_attn.rope, CompiledRope) for b in model.layers)
    fp32 = load_model(tiny_llama_dir, torch.float32, "cpu")
    assert not any(isinstance(m, (CompiledRMSNorm, CompiledRope)) for m in fp32.modules())


def test_ffn_kinds_are_the_same_in_python_and_cpp():
    """The named contract: runtime/decode_contract.py's FfnKind mirrors `enum FfnKind` of the C++ source."""
    source = "".join(p.read_text() for p in (SOURCE, *HEADERS))
    enum = re.search(r"enum FfnKind : int64_t \{([^}]*)\}", source).group(1)
    cpp = {name.strip().removeprefix("k").upper(): int(value) for name, value in
           (item.split("=") for item in enum.split(","))}
    assert cpp == {kind.name.replace("_", ""): kind.value for kind in FfnKind}


def test_block_formats_with_kernels_match_the_cpp_constants():
    """Each block format whose record names compiled kernels has the block size the C++ kernels assume."""
    from partinfer.common.formats.blocks import BLOCK_FORMATS
    from partinfer.runtime.native import kernel_block_bytes

    with_kernels = [f for f in BLOCK_FORMATS.values() if f.kernel is not None]
    assert {f.name for f in with_kernels} == {"Q4_1", "Q8_0"}
    for fmt in with_kernels:
        assert fmt.block == 32 and kernel_block_bytes(fmt.kernel) == fmt.block_bytes, fmt.name
    for fmt in BLOCK_FORMATS.values():  # formats with a compiled de-quantizer alone
        if fmt.dequant_kernel is not None:
            assert fmt.block == 256 and kernel_block_bytes(fmt.dequant_kernel) == fmt.block_bytes, fmt.name
    with pytest.raises(RuntimeError, match="no compiled kernels"):
        kernel_block_bytes("q5_0")


def test_the_compiled_backend_is_chosen_once_for_bf16_on_this_cpu(tiny_llama_dir):
    assert isinstance(load_model(tiny_llama_dir, torch.bfloat16, "cpu").backend, CompiledCPUDecode)
    assert type(load_model(tiny_llama_dir, torch.float32, "cpu").backend) is EagerDecode


def test_prefill_upcasts_bf16_only_without_bf16_instructions(monkeypatch):
    """Many bf16 tokens compute in fp32 on AVX2-only CPUs and stay bf16 where the CPU has bf16 math."""
    import partinfer.runtime.kernels
    from partinfer.runtime.kernels import cpu_prefers_fp32

    W, prompt, token = torch.randn(48, 32).bfloat16(), torch.randn(1, 64, 32).bfloat16(), torch.randn(1, 1, 32).bfloat16()
    monkeypatch.setattr(partinfer.runtime.kernels, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert cpu_prefers_fp32(prompt, W) and not cpu_prefers_fp32(token, W)
    monkeypatch.setattr(partinfer.runtime.kernels, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512_bf16"}))
    assert not cpu_prefers_fp32(prompt, W) and cpu_prefers_fp32(prompt, W.half())


def test_tokenwise_decode_layer(tiny_llama_dir, tmp_path):
    """bf16 token-wise decode of one layer (eager): round(φn) neurons with the base among them, and the
    layer's output equals a dense fp32 computation restricted to the chosen neurons."""
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
    cache = KVCache(model.cfg, 1, len(prompt) + len(tokens), model.dtype, "cpu")
    with torch.inference_mode():
        prefill(model, torch.tensor([prompt]), cache)  # selects
        return torch.stack([decode_step(model, torch.tensor([t]), cache)[0].float() for t in tokens])


@pytest.mark.parametrize("method", ["dense", "partinfer", "tokenwise"])
def test_compiled_decode_as_accurate_as_eager_bf16(tiny_llama_dir, tmp_path, method):
    """The compiled one-op decode: logits stay as close to an fp32 run of the same bf16 weights as the
    eager bf16 ops are."""
    neurons = make_neuron_file(tiny_llama_dir, tmp_path / "model.safetensors")
    sparsity = SparsityConfig(method=method, gamma=0.7, delta=0.3, phi=0.4, model_neurons=neurons)
    prompt, tokens = [5, 17, 99, 3, 42, 7], [11, 23, 8, 64, 2, 31]
    fused = decode_logits(load_model(tiny_llama_dir, torch.bfloat16, "cpu", sparsity), prompt, tokens)
    reference_model = load_model(tiny_llama_dir, torch.bfloat16, "cpu", sparsity).float()
    reference = decode_logits(reference_model, prompt, tokens)
    eager_model = load_model(tiny_llama_dir, torch.bfloat16, "cpu", sparsity)
    eager_model.backend = EagerDecode()  # the same weights through the stock PyTorch ops
    eager = decode_logits(eager_model, prompt, tokens)
    fused_err, eager_err = (fused - reference).abs().max(), (eager - reference).abs().max()
    assert fused_err <= 2 * eager_err + 1e-2, (fused_err, eager_err)


def test_argmax_matches_torch():
    """The greedy sampler's compiled argmax: first maximum on ties, NaN first, fp32 and bf16 rows."""
    from partinfer.runtime.native import argmax

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1003, generator=g)  # not a multiple of the 8-wide vector
    x[1, 10] = x[1, 500] = x[1].max() + 1  # a tie: the first wins
    x[2, 7] = x[2, 900] = float("nan")
    x[3, 1002] = 50.0  # in the scalar tail
    for t in (x, x.bfloat16()):
        assert torch.equal(argmax(t), t.argmax(dim=-1))


def test_kept_decode_arguments_follow_a_new_prompt(tiny_llama_dir, tmp_path):
    """The backend keeps one C++ decode plan between tokens, built and checked once per sentence. A new
    prompt gives the token-wise layers a new score scale, which must reach them: decoding after a second
    prompt equals decoding it on a freshly loaded model."""
    neurons = make_neuron_file(tiny_llama_dir, tmp_path / "model.safetensors")
    sparsity = SparsityConfig(method="tokenwise", gamma=0.7, delta=0.3, phi=0.4, model_neurons=neurons, start_num=0,
                              end_num=3)
    first, second, tokens = [5, 17, 99, 3, 42, 7], [90, 1, 30, 77, 64, 60, 9], [11, 23, 8, 64, 2, 31]
    reused = load_model(tiny_llama_dir, torch.bfloat16, "cpu", sparsity)
    decode_logits(reused, first, tokens)
    plan = reused.backend.plan
    assert reused.backend.plans_built == 1  # six tokens, one plan: checked once for the sentence
    again = decode_logits(reused, second, tokens)
    assert plan is not None and reused.backend.plan is not plan and reused.backend.plans_built == 2
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
    assert model.backend.plans_built == 2
    for layer in model.layers:
        record = layer.mlp.decode_weights()  # what the sentence's plan was made from
        w1, w2, m = record.w1, record.w2, layer.mlp.n_active
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


def test_tokenwise_ties_go_to_the_lower_position_in_python_and_cpp(tiny_llama_dir, tmp_path):
    """One token-wise rule in both implementations: equal scores go to the lower loaded position. Every
    neuron of the sparse layers gets the same gate and up rows (so every score ties) and its own down
    row, the rows past the lowest choice made large (so the choice shows in the output): the compiled
    decode matches the eager one, which picks the lowest positions, and not a choice of the highest."""
    neurons = make_neuron_file(tiny_llama_dir, tmp_path / "model.safetensors")
    sparsity = SparsityConfig(method="tokenwise", gamma=0.7, delta=0.3, phi=0.4, token_score="gate",
                              model_neurons=neurons, start_num=0, end_num=3)
    prompt, tokens = [5, 17, 99, 3, 42, 7], [11, 23, 8, 64]

    def tied(model):
        for layer in sparse_modules(model):
            layer.gate.data[:] = layer.gate.data[0]
            layer.up.data[:] = layer.up.data[0]
            layer.down_t.data[layer.n_active:] *= 8  # a choice of these would stand out in the logits
        return model

    compiled = decode_logits(tied(load_model(tiny_llama_dir, torch.bfloat16, "cpu", sparsity)), prompt, tokens)
    eager_model = tied(load_model(tiny_llama_dir, torch.bfloat16, "cpu", sparsity)).float()
    layer = sparse_modules(eager_model)[0]
    scores = torch.ones(1, 1, layer.n_loaded)
    assert layer.select(scores)[0, 0].tolist() == list(range(layer.n_active))  # the lowest positions
    for layer in sparse_modules(eager_model):  # fp32 GEMM tails can break the ties by a last bit: tie them exactly
        layer.select = lambda act_gate, layer=layer: TokenwiseFFN.select(layer, torch.ones_like(act_gate))
    lowest = decode_logits(eager_model, prompt, tokens)
    flipped = tied(load_model(tiny_llama_dir, torch.bfloat16, "cpu", sparsity)).float()
    for layer in sparse_modules(flipped):  # the other rule: the highest positions among the ties
        layer.select = lambda act_gate, layer=layer: torch.cat([
            torch.arange(layer.n_base), torch.arange(layer.n_loaded - layer.n_active + layer.n_base, layer.n_loaded)
        ]).expand(*act_gate.shape[:2], -1)
    highest = decode_logits(flipped, prompt, tokens)
    assert (compiled - lowest).abs().max() < 0.25 * (highest - lowest).abs().max()
