"""A tiny Qwen2-shaped model whose GGUF source holds real Q4_K and Q6_K blocks, as the 1.5B coding model's
Q4_K_M file does: `--weights q4` keeps every block bit for bit, and every method runs on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from partinfer.common.formats.blocks import BLOCK_FORMATS
from partinfer.common.formats.pack_format import PackManifest
from partinfer.common.output_dir import manifest_name
from partinfer.runtime.checkpoint import CheckpointReader
from partinfer.runtime.generate import generate
from partinfer.runtime.kernels import K_PRODUCT_TOKENS
from partinfer.runtime.loader import load_model
from partinfer.runtime.model import KVCache, prefill
from partinfer.runtime.native import cpu_flags, cpu_kernels
from partinfer.runtime.pack import pack_checkpoint
from partinfer.runtime.quant import columns_from_rows, quantize_column_activations
from partinfer.runtime.sparsity import METHODS, SparsityConfig
from tests.helpers import make_neuron_file, tiny_prompts
from tests.test_compact_weights import random_k_blocks

D, N, HEADS, KV, LAYERS, VOCAB = 256, 512, 4, 2, 3, 256
# HF name -> (GGUF name, format): the Q4_K_M layout of the coding model (down and the head in Q6_K)
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def k_format(proj: str, layer: int = 0) -> str:
    """As the 1.5B file: Q4_K, but Q6_K for the head and, in every other layer, for v and down."""
    return "Q6_K" if proj == "lm_head" or (proj in ("v_proj", "down_proj") and layer % 2 == 0) else "Q4_K"


def gguf_qwen2_model(root: Path, d: int, n: int, format_of) -> dict:
    """A Qwen2 checkpoint whose matrices are a GGUF's block values (`format_of(proj, layer)` names each
    matrix's format; its `partinfer prepare` manifest names that GGUF as the source, as a converted
    registry model's does), its neuron file and its `--weights q4` pack."""
    import gguf
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=d, intermediate_size=n, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    writer = gguf.GGUFWriter(str(root / "tiny.gguf"), "qwen2")
    seed = 0
    state = model.state_dict()
    for name, tensor in state.items():  # Qwen2's q/k/v biases: not the zeros transformers starts them at, and
        if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):  # large enough to matter to the logits
            tensor.normal_(0, 30.0)

    def add(hf_name: str, gguf_name: str, fmt_name: str, rows: int, cols: int) -> None:
        nonlocal seed
        fmt = BLOCK_FORMATS[fmt_name]
        blocks = random_k_blocks(fmt, rows, cols, seed=seed)
        seed += 1
        writer.add_tensor(gguf_name, blocks.numpy(), raw_shape=(rows, fmt.row_bytes(cols)),
                          raw_dtype=getattr(gguf.GGMLQuantizationType, fmt_name))
        state[hf_name].copy_(fmt.dequantize(blocks, cols))

    for i in range(LAYERS):
        for proj, short in GGUF_NAMES.items():
            part = "mlp" if proj.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            name = f"model.layers.{i}.{part}.{proj}.weight"
            add(name, f"blk.{i}.{short}.weight", format_of(proj, i), *state[name].shape)
    add("model.embed_tokens.weight", "token_embd.weight", format_of("embed_tokens"), VOCAB, d)
    add("lm_head.weight", "output.weight", format_of("lm_head"), VOCAB, d)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.load_state_dict(state)
    model.save_pretrained(root / "model")
    (root / "model" / manifest_name("prepare")).write_text(json.dumps(
        {"output": "partinfer-output", "command": "prepare", "files": [], "source": str(root / "tiny.gguf")}))
    neurons = make_neuron_file(root / "model", root / "neurons.safetensors")
    return {"model": root / "model", "gguf": root / "tiny.gguf", "neurons": neurons,
            "q4": pack_checkpoint(root / "model", neurons, root / "q4", "q4")}


@pytest.fixture(scope="module")
def k_model(tmp_path_factory) -> dict:
    return gguf_qwen2_model(tmp_path_factory.mktemp("kq"), D, N, k_format)


def test_q4_pack_keeps_every_k_quant_block_bit_for_bit(k_model):
    import gguf

    manifest = PackManifest.read(k_model["q4"])
    formats = manifest.tensor_formats
    assert formats["model.layers.0.mlp.gate_proj.weight"] == "Q4_K" and formats["lm_head.weight"] == "Q6_K"
    assert formats["model.layers.2.mlp.down_proj.weight"] == "Q6_K" and formats["model.layers.1.mlp.down_proj.weight"] == "Q4_K"
    assert formats["model.layers.0.self_attn.v_proj.weight"] == "Q6_K" and formats["model.layers.0.self_attn.q_proj.weight"] == "Q4_K"
    source = {t.name: t for t in gguf.GGUFReader(k_model["gguf"]).tensors}
    with CheckpointReader(k_model["q4"]) as packed:
        for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                     "model.embed_tokens.weight", "lm_head.weight"):
            short = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
                     "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight"}.get(name, "blk.1.attn_q.weight")
            assert np.array_equal(packed.get(name).numpy(), source[short].data)  # the same bytes
        perm = packed.get("model.layers.2.mlp.perm").long()
        bundle = packed.get("model.layers.2.mlp.bundle")
        q4k = BLOCK_FORMATS["Q4_K"]
        g = q4k.row_bytes(D)
        assert np.array_equal(bundle[:, :g].numpy(), source["blk.2.ffn_gate.weight"].data[perm.numpy()])
        from partinfer.runtime.quant import dequantize_columns

        q6k = BLOCK_FORMATS["Q6_K"]
        down = dequantize_columns(bundle[:, 2 * g :], packed.get("model.layers.2.mlp.down_table"), perm, q6k)
        theirs = gguf.quants.dequantize(source["blk.2.ffn_down.weight"].data, gguf.GGMLQuantizationType.Q6_K)
        assert torch.equal(down, torch.from_numpy(theirs.astype(np.float32)).t()[perm])


def forced_decode_logits(model, prompts: list[list[int]], tokens: list[list[int]]) -> list[torch.Tensor]:
    """The logits [B, V] of the prompt's last position and of each decode step fed `tokens` (as `generate`
    runs them), so that two models are compared on the same sequences."""
    from partinfer.runtime.generate import left_pad
    from partinfer.runtime.model import decode_step

    ids, mask = left_pad(prompts, 0)
    cache = KVCache(model.cfg, ids.shape[0], ids.shape[1] + len(tokens[0]), torch.float32, "cpu")
    steps = [prefill(model, ids, cache, mask)[:, -1]]
    for i in range(len(tokens[0]) - 1):
        steps.append(decode_step(model, torch.tensor([t[i] for t in tokens]), cache))
    return steps


def assert_same_decisions(got: list[torch.Tensor], want: list[torch.Tensor], method: str) -> None:
    """φ = γ = 1 computes dense's neurons: near dense's logits at every step and the same greedy token
    wherever dense's choice is not a near tie. (The methods' arithmetic differs in rounding: a batch's
    per-sequence sets are summed in fp32, dense in 8-bit integers; on this peaked random model that is
    up to ~1 % of a logit, enough to swap two tokens whose logits lie within 0.4 % of each other.)"""
    for step, (g, w) in enumerate(zip(got, want)):
        assert (g - w).norm() < 0.03 * w.norm(), (method, step, ((g - w).norm() / w.norm()).item())
        top = w.topk(2, dim=-1).values  # [B, 2]
        clear = (top[:, 0] - top[:, 1]) > 0.02 * top[:, 0].abs()
        assert torch.equal(g.argmax(-1)[clear], w.argmax(-1)[clear]), (method, step)


def test_k_quant_weights_run_every_method_and_give_dense_tokens_at_full_budget(k_model):
    ref = load_model(k_model["model"], torch.float32, "cpu")  # the same values, as fp32 safetensors
    dense = load_model(k_model["q4"], torch.float32, "cpu")
    from partinfer.runtime.kernels import MixedCompactLinear

    assert isinstance(dense.layers[0].self_attn.qkv_proj, MixedCompactLinear)  # Q4_K q, k with a Q6_K v
    import gguf

    from partinfer.runtime.ffn import CompactRowsFFN

    source = {t.name: t for t in gguf.GGUFReader(k_model["gguf"]).tensors}
    for i, layer in enumerate(dense.layers):  # dense reads down as the GGUF's own rows, byte for byte
        assert isinstance(layer.mlp, CompactRowsFFN) and layer.mlp.down_format.name == k_format("down_proj", i)
        assert np.array_equal(layer.mlp.down.numpy(), source[f"blk.{i}.ffn_down.weight"].data)
    # prompts run on the integer products (inputs quantized to 8 bits): near the exact values. This random
    # model's large q/k/v biases make attention so peaked that a 0.1 % difference in q can move a prompt's
    # logits by half (one prompt in ten, whichever kernel), so the typical prompt is what is asked for:
    # the median over ten (1.6-1.9 % here, for the per-32 prompt products and for the per-256 ones alike).
    errors = []
    for seed in range(10):
        ids = torch.tensor([tiny_prompts(1, seed=seed, vocab=VOCAB)[0]])
        want = prefill(ref, ids, KVCache(ref.cfg, 1, 32, torch.float32, "cpu"), logits_for="all")
        got = prefill(dense, ids, KVCache(dense.cfg, 1, 32, torch.float32, "cpu"), logits_for="all")
        errors.append(((got - want).norm() / want.norm()).item())
    assert sorted(errors)[5] < 0.05, errors
    # a long prompt, in chunks of K_PRODUCT_TOKENS tokens
    long_ids = torch.randint(3, VOCAB, (1, K_PRODUCT_TOKENS + 3), generator=torch.Generator().manual_seed(5))
    want = prefill(ref, long_ids, KVCache(ref.cfg, 1, 160, torch.float32, "cpu"), logits_for="all")
    got = prefill(dense, long_ids, KVCache(dense.cfg, 1, 160, torch.float32, "cpu"), logits_for="all")
    assert (got - want).norm() < 0.2 * want.norm(), ((got - want).norm() / want.norm()).item()  # 13 %: more tokens, more outliers
    prompts = tiny_prompts(2, seed=6, vocab=VOCAB)
    dense_tokens = generate(dense, prompts, 5).tokens
    dense_steps = forced_decode_logits(dense, prompts, dense_tokens)
    for method in METHODS[1:]:
        full = SparsityConfig(method=method, gamma=1.0, delta=0.3 if method != "load-only" else 1.0, phi=1.0,
                              model_neurons=k_model["neurons"], start_num=0, end_num=LAYERS - 1)
        model = load_model(k_model["q4"], torch.float32, "cpu", full)
        assert_same_decisions(forced_decode_logits(model, prompts, dense_tokens), dense_steps, method)
        if method == "tokenwise":  # one sequence: its chosen rows and columns read in place
            one = forced_decode_logits(dense, prompts[:1], dense_tokens[:1])
            assert_same_decisions(forced_decode_logits(model, prompts[:1], dense_tokens[:1]), one, method)
    sparse = load_model(k_model["q4"], torch.bfloat16, "cpu", SparsityConfig(model_neurons=k_model["neurons"]))
    assert len(generate(sparse, prompts[:1], 4).tokens[0]) == 4  # the default method, bf16, on K-quant rows


def fallback_format(proj: str, layer: int = 0) -> str:
    """A Q4_K_M file of a model whose rows are not multiples of 256: Q5_0 where it would hold Q4_K, Q8_0
    where it would hold Q6_K."""
    return {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[k_format(proj, layer)]


@pytest.fixture(scope="module")
def fallback_model(tmp_path_factory) -> dict:
    return gguf_qwen2_model(tmp_path_factory.mktemp("fallback"), 160, 320, fallback_format)


def test_q5_0_equals_gguf_py_quantizer_and_de_quantizer():
    """Q5_0 (a Q4_K_M file's stand-in for Q4_K): our quantizer writes gguf-py's bytes, and any blocks
    de-quantize to its values; down split into columns keeps every value."""
    import gguf.quants

    fmt = BLOCK_FORMATS["Q5_0"]
    x = torch.randn(12, 96) * torch.rand(12, 1) * 4
    x[0], x[1, :32] = 0.0, -0.25  # an all-zero block, a constant one
    assert np.array_equal(fmt.quantize(x).numpy(), gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q5_0))
    rows = random_k_blocks(fmt, 64, 96, seed=3)
    want = torch.from_numpy(gguf.quants.dequantize(rows.numpy(), gguf.GGMLQuantizationType.Q5_0).astype(np.float32))
    assert torch.equal(fmt.dequantize(rows, 96), want)
    from partinfer.runtime.quant import dequantize_columns

    down = random_k_blocks(fmt, 96, 64, seed=4)  # [d, n]: blocks along the neurons
    codes, table = columns_from_rows(down, fmt)
    ids = torch.tensor([63, 0, 31, 32, 5])
    assert torch.equal(dequantize_columns(codes[ids], table, ids, fmt), fmt.dequantize(down, 64).t()[ids])


def test_q5_0_and_q8_0_fallbacks_pack_bit_for_bit_and_every_method_gives_dense_tokens(fallback_model):
    """A Q4_K_M file of a 160-wide model (no row a multiple of 256) holds Q5_0 and Q8_0: `--weights q4`
    keeps their blocks, the model runs as its fp32 values do, and φ = γ = 1 gives dense tokens for every method."""
    import gguf

    formats = PackManifest.read(fallback_model["q4"]).tensor_formats
    assert formats["model.layers.0.mlp.gate_proj.weight"] == "Q5_0" and formats["lm_head.weight"] == "Q8_0"
    assert formats["model.layers.0.mlp.down_proj.weight"] == "Q8_0" and formats["model.layers.1.mlp.down_proj.weight"] == "Q5_0"
    source = {t.name: t for t in gguf.GGUFReader(fallback_model["gguf"]).tensors}
    with CheckpointReader(fallback_model["q4"]) as packed:
        for name, short in (("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight"),
                            ("model.embed_tokens.weight", "token_embd.weight"), ("lm_head.weight", "output.weight")):
            assert np.array_equal(packed.get(name).numpy(), source[short].data)  # the same bytes
        from partinfer.runtime.quant import dequantize_columns

        for layer, fmt_name in ((0, "Q8_0"), (1, "Q5_0")):
            fmt, perm = BLOCK_FORMATS[fmt_name], packed.get(f"model.layers.{layer}.mlp.perm").long()
            bundle = packed.get(f"model.layers.{layer}.mlp.bundle")
            g = BLOCK_FORMATS["Q5_0"].row_bytes(160)
            down = dequantize_columns(bundle[:, 2 * g :], packed.get(f"model.layers.{layer}.mlp.down_table"), perm, fmt)
            theirs = gguf.quants.dequantize(source[f"blk.{layer}.ffn_down.weight"].data,
                                            getattr(gguf.GGMLQuantizationType, fmt_name))
            assert torch.equal(down, torch.from_numpy(theirs.astype(np.float32)).t()[perm])
    ref = load_model(fallback_model["model"], torch.float32, "cpu")
    dense = load_model(fallback_model["q4"], torch.float32, "cpu")
    ids = torch.tensor([tiny_prompts(1, seed=1, vocab=VOCAB)[0]])
    want = prefill(ref, ids, KVCache(ref.cfg, 1, 32, torch.float32, "cpu"), logits_for="all")
    got = prefill(dense, ids, KVCache(dense.cfg, 1, 32, torch.float32, "cpu"), logits_for="all")
    assert (got - want).norm() < 1e-3 * want.norm(), ((got - want).norm() / want.norm()).item()
    prompts = tiny_prompts(2, seed=6, vocab=VOCAB)
    dense_tokens = generate(dense, prompts, 5).tokens
    for method in METHODS[1:]:
        full = SparsityConfig(method=method, gamma=1.0, delta=0.3 if method != "load-only" else 1.0, phi=1.0,
                              model_neurons=fallback_model["neurons"], start_num=0, end_num=LAYERS - 1)
        assert generate(load_model(fallback_model["q4"], torch.float32, "cpu", full), prompts, 5).tokens == dense_tokens, method


# ---- a named model from its PyPI parts ----


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """A registry entry whose three parts are packages made here (what the 22 coding-model packages are)."""
    import hashlib

    from partinfer.common import model_registry
    from partinfer.common.model_registry import NamedModel

    data = [bytes([i]) * (1000 + i) for i in range(3)]
    for i, blob in enumerate(data):
        pkg = tmp_path / "site" / f"fake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"".join(data)
    entry = NamedModel("fake-model", "Fake-Model", "fake.gguf",
                       tuple((f"fake_part{i}", f"data/part{i:02d}.bin") for i in range(3)), len(whole),
                       hashlib.sha256(whole).hexdigest(), "pip install fake-parts")
    monkeypatch.setitem(model_registry.NAMED_MODELS, entry.name, entry)
    monkeypatch.setenv("PARTINFER_HOME", str(tmp_path / "home"))
    return {"entry": entry, "site": tmp_path / "site", "bytes": whole}


def test_parts_assemble_once_into_the_pinned_file(fake_parts):
    from partinfer.runtime.prepare import assemble_gguf

    out = assemble_gguf(fake_parts["entry"])
    assert out.read_bytes() == fake_parts["bytes"] and out.name == "fake.gguf"
    mtime = out.stat().st_mtime_ns
    assert assemble_gguf(fake_parts["entry"]).stat().st_mtime_ns == mtime  # a second run does nothing


def test_a_missing_part_is_a_one_line_error_naming_the_install(fake_parts):
    import shutil

    from typer.testing import CliRunner

    from partinfer.cli.app import app
    from tests.test_cli import assert_clean_error

    shutil.rmtree(fake_parts["site"] / "fake_part1")
    done = CliRunner().invoke(app, ["prepare", "fake-model"])
    assert_clean_error(done, "fake-part1", "pip install fake-parts")
    assert not (fake_parts["site"].parent / "home" / "gguf").exists() or \
        list((fake_parts["site"].parent / "home" / "gguf").iterdir()) == []


def test_a_damaged_part_leaves_no_half_assembled_file(fake_parts):
    from partinfer.common.errors import PartinferError
    from partinfer.runtime.prepare import assemble_gguf

    part = fake_parts["site"] / "fake_part2" / "data" / "part02.bin"
    part.write_bytes(b"\x07" + part.read_bytes()[1:])  # one byte changed, same size
    with pytest.raises(PartinferError, match="SHA-256.*reinstall the parts"):
        assemble_gguf(fake_parts["entry"])
    assert list((fake_parts["site"].parent / "home" / "gguf").iterdir()) == []


def test_an_untied_compact_embedding_stays_on_disk(k_model):
    """The input embedding of an untied model is read per token, never resident: no embedding tensor in
    the model, the same logits as the resident rows give."""
    from partinfer.runtime.kernels import CompactEmbedding, DiskEmbedding

    model = load_model(k_model["q4"], torch.float32, "cpu")
    assert isinstance(model.embed_tokens, DiskEmbedding)
    assert not any("embed_tokens" in name for name, _ in model.named_parameters())
    tokens = torch.tensor([[5, 200, 5, 17], [0, 255, 9, 9]])
    with CheckpointReader(k_model["q4"]) as reader:
        resident = CompactEmbedding(VOCAB, D, BLOCK_FORMATS["Q4_K"], torch.float32)
        resident.weight = torch.nn.Parameter(reader.get("model.embed_tokens.weight"), requires_grad=False)
    assert torch.equal(model.embed_tokens(tokens), resident(tokens))
    with pytest.raises(IndexError):
        model.embed_tokens(torch.tensor([VOCAB]))


@pytest.mark.skipif(not cpu_kernels(), reason="no compiled kernels on this CPU")
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_k_quant_row_products_equal_dequantize_then_fp64_matmul(name):
    """`gemv_k`: rows . inputs quantized per 256 (Q8_K) against de-quantized rows times those inputs in fp64:
    all rows, a row subset out of order, several tokens, inputs of very different sizes."""
    from partinfer.runtime.native import gemv_k
    from partinfer.runtime.quant import quantize_activation

    fmt = BLOCK_FORMATS[name]
    rows = random_k_blocks(fmt, 37, 768, seed=5)  # 37 rows: no multiple of the threads' share
    x = torch.randn(3, 768) * torch.tensor([1.0, 1e-3, 40.0]).repeat_interleave(256)
    w = fmt.dequantize(rows, 768).double()
    want = quantize_activation(x, 256).double() @ w.t()  # [3, 37]
    got = gemv_k(rows, x, fmt.dequant_kernel)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    prompt = torch.cat([x, x.flip(0), x[:1]])  # 7 tokens: four per pass over a row, then the rest
    assert torch.allclose(gemv_k(rows, prompt, fmt.dequant_kernel).double(), torch.cat([want, want.flip(0), want[:1]]),
                          rtol=1e-4, atol=1e-4 * want.abs().max().item())
    subset = torch.tensor([30, 2, 2, 17, 0, 36])
    assert torch.allclose(gemv_k(rows, x, fmt.dequant_kernel, subset).double(), want[:, subset], rtol=1e-4,
                          atol=1e-4 * want.abs().max().item())
    for t in range(3):  # one token (decode): four rows per pass, then the row tail; all rows and the subset
        assert torch.allclose(gemv_k(rows, x[t:t + 1], fmt.dequant_kernel).double(), want[t:t + 1], rtol=1e-4,
                              atol=1e-4 * want.abs().max().item())
        assert torch.allclose(gemv_k(rows, x[t:t + 1], fmt.dequant_kernel, subset).double(), want[t:t + 1, subset],
                              rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.skipif(not cpu_kernels(), reason="no compiled kernels on this CPU")
def test_prompt_product_on_q4_k_rows_equals_dequantize_then_fp64_matmul():
    """`rows_gemm`: a prompt times Q4_K rows (every other row of gate/up pairs, read in
    place) against de-quantized rows times the input quantized per 32 in fp64; token and row tails, a
    bf16 prompt with a bias."""
    from partinfer.runtime.native import rows_gemm
    from partinfer.runtime.quant import quantize_activation

    fmt = BLOCK_FORMATS["Q4_K"]
    pairs = torch.stack([random_k_blocks(fmt, 37, 768, seed=5), random_k_blocks(fmt, 37, 768, seed=6)], dim=1)
    for tokens in (1, 13):  # one pass of eight, four, then single tokens
        x = torch.randn(tokens, 768) * torch.tensor([1.0, 1e-3, 40.0]).repeat_interleave(256)
        for j in (0, 1):
            want = quantize_activation(x, 32).double() @ fmt.dequantize(pairs[:, j].contiguous(), 768).double().t()
            got = rows_gemm(pairs[:, j], x, "q4_k")
            assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        bias = torch.randn(37)
        want = quantize_activation(x.bfloat16().float(), 32).double() @ fmt.dequantize(pairs[:, 1].contiguous(), 768).double().t()
        got = rows_gemm(pairs[:, 1], x.bfloat16(), "q4_k", bias)
        assert got.dtype == torch.bfloat16
        assert torch.allclose(got.double(), want + bias.double(), rtol=1e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.skipif(not cpu_kernels(), reason="no compiled kernels on this CPU")
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_k_quant_down_columns_sum_equals_the_fp64_sum(name):
    """`down_k`: the down columns of any neuron subset, in any order, summed with per-token activations
    (quantized to 8 bits per block of 256 neurons, as the kernel does), against the de-quantized columns in fp64."""
    from partinfer.runtime.native import down_k

    fmt = BLOCK_FORMATS[name]
    d, n = 512, 768
    down_rows = random_k_blocks(fmt, d, n, seed=7)  # down [d, n]: blocks along the neurons
    codes, table = columns_from_rows(down_rows, fmt)
    columns = fmt.dequantize(down_rows, n).t().double()  # [n, d]
    for ids in (torch.arange(n), torch.tensor([700, 3, 256, 255, 4, 511, 300, 301, 17]), torch.randperm(n)[:333]):
        a = torch.randn(5, ids.numel())  # five tokens: four summed together, then one
        got = down_k(codes[ids].contiguous(), table, ids, a, fmt.dequant_kernel)
        want = quantize_column_activations(a, ids, fmt).double() @ columns[ids]  # 8 bits per block of 256
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), ids[:5]
        in_place = down_k(codes, table, ids, a, fmt.dequant_kernel, ids)  # rows read in place: the same sums
        assert torch.allclose(in_place, got, rtol=1e-5, atol=1e-5 * got.abs().max().item())


@pytest.mark.skipif(not cpu_kernels(), reason="no compiled kernels on this CPU")
@pytest.mark.parametrize("path", ["avx2", "avx512-vnni"])
def test_k_quant_products_on_each_isa_path(path):
    """The row and column products above and a prompt's product on Q4_K rows, in a process that runs the AVX2 kernels (PARTINFER_VNNI=0) or
    the AVX-512 VNNI ones (where the CPU has them): the kernels are chosen once per process."""
    if path == "avx512-vnni" and not {"avx512_vnni", "avx512vl", "avx512bw"} <= cpu_flags():
        pytest.skip("this CPU has no AVX-512 VNNI")
    tests = [f"{__file__}::{name}" for name in ("test_k_quant_row_products_equal_dequantize_then_fp64_matmul",
                                                 "test_k_quant_down_columns_sum_equals_the_fp64_sum",
                                                 "test_prompt_product_on_q4_k_rows_equals_dequantize_then_fp64_matmul")]
    child = ("import sys, pytest; from partinfer.runtime.native import compact_kernel_path, cpu_kernels; cpu_kernels(); "
             f"print('path', compact_kernel_path()); sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *{tests!r}]))")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PARTINFER_VNNI": "1" if path == "avx512-vnni" else "0"},
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"path {path}" in done.stdout and "5 passed" in done.stdout


@pytest.mark.skipif(not cpu_kernels(), reason="no compiled kernels on this CPU")
def test_compiled_decode_gives_the_same_logits_whichever_thread_runs_a_chunk(k_model):
    """The decode step hands chunks of rows to whichever thread asks: sums are kept per chunk and added in
    chunk order, so repeated steps give bit-identical logits (which thread ran what differs run to run)."""
    from partinfer.runtime.model import decode_step

    sparsity = SparsityConfig(method="tokenwise", gamma=0.7, delta=0.3, phi=0.4, model_neurons=k_model["neurons"],
                              start_num=0, end_num=LAYERS - 1)
    model = load_model(k_model["q4"], torch.bfloat16, "cpu", sparsity)
    runs = []
    for _ in range(4):
        cache = KVCache(model.cfg, 1, 64, torch.bfloat16, "cpu")
        prefill(model, torch.tensor([tiny_prompts(1, seed=4, vocab=VOCAB)[0]]), cache)
        runs.append(torch.stack([decode_step(model, torch.tensor([t]), cache) for t in (5, 9, 17, 3, 8)]))
    assert all(torch.equal(run, runs[0]) for run in runs[1:])


@pytest.mark.skipif(not cpu_kernels(), reason="no compiled kernels on this CPU")
@pytest.mark.parametrize("method", ["dense", "partinfer", "tokenwise"])
def test_compiled_decode_on_k_quants_equals_eager(k_model, method):
    """The one-op decode on Q4_K/Q6_K rows and columns, q/k/v apart (their formats differ) with Qwen2's
    biases, against the eager forward of the same weights: the same logits up to summation order."""
    from partinfer.runtime.decode import CompiledCPUDecode, EagerDecode
    from partinfer.runtime.model import decode_step

    logits = []
    for eager in (False, True):
        sparsity = SparsityConfig(method=method, gamma=0.7, delta=0.3, phi=0.4, model_neurons=k_model["neurons"],
                                  start_num=0, end_num=LAYERS - 1)
        model = load_model(k_model["q4"], torch.bfloat16, "cpu", sparsity)
        if eager:
            model.backend = EagerDecode()
        else:
            assert isinstance(model.backend, CompiledCPUDecode)
        cache = KVCache(model.cfg, 1, 64, torch.bfloat16, "cpu")
        prefill(model, torch.tensor([tiny_prompts(1, seed=4, vocab=VOCAB)[0]]), cache)
        steps = [decode_step(model, torch.tensor([t]), cache).float() for t in (5, 9, 17)]
        if not eager:
            assert model.backend.plans_built == 1
        logits.append(torch.stack(steps))
    compiled, eager = logits
    # bf16 logits and summation order alone: ~0.9 % of the logits' norm here; the step without the biases: ~2 %
    assert (compiled - eager).norm() < 0.015 * eager.norm(), ((compiled - eager).norm() / eager.norm()).item()
