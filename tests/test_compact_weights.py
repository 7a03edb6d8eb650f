"""Compact 4/8-bit weights: formats against ggml's reference, kernels against de-quantize + matmul,
the embedded model's GGUF blocks kept bit for bit, every method on compact rows, partial loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from partinfer.runtime.generate import generate
from partinfer.runtime.checkpoint import CheckpointReader
from partinfer.runtime.loader import load_model
from partinfer.runtime.native import cpu_flags, cpu_kernels
from partinfer.runtime.pack import pack_checkpoint
from partinfer.common.formats.blocks import BLOCK_FORMATS, Q4_1
from partinfer.runtime.quant import (columns_from_rows, dequantize, dequantize_columns, dequantize_columns_reference,
                                     quantize_activation, rows_from_columns)
from partinfer.runtime.sparse_ffn import CompactSparseFFN, sparse_modules
from partinfer.runtime.sparsity import METHODS, SparsityConfig, fraction_count
from tests.helpers import make_neuron_file, tiny_prompts

FORMATS = [BLOCK_FORMATS["Q4_1"], BLOCK_FORMATS["Q8_0"]]
needs_kernels = pytest.mark.skipif(not cpu_kernels(), reason="no compiled CPU kernels on this machine")


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_formats_match_ggml_reference(fmt):
    """Our quantizer writes the bytes gguf-py's ggml reference writes; de-quantizing gives its values."""
    import gguf.quants

    qtype = getattr(gguf.GGMLQuantizationType, fmt.name)
    w = torch.randn(37, 96) * torch.rand(37, 1) * 3
    w[3, :32] = 0.5  # a constant block (zero scale)
    ours = fmt.quantize(w)
    theirs = gguf.quants.quantize(w.numpy(), qtype)
    assert np.array_equal(ours.numpy(), theirs)
    ref = torch.from_numpy(gguf.quants.dequantize(theirs, qtype).astype(np.float32))
    assert torch.equal(fmt.dequantize(ours, 96), ref)
    if cpu_kernels():
        assert torch.equal(dequantize(ours, fmt, 96), ref)  # the compiled de-quantizer: same values
        assert torch.equal(dequantize(ours, fmt, 96, torch.bfloat16), ref.bfloat16())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_down_columns_hold_the_rows_values_exactly(fmt):
    """Splitting down's row blocks into per-neuron codes and a block table keeps every value: any subset
    of neurons, in any order, de-quantizes (reference and compiled) to the rows' own values."""
    w = torch.randn(64, 96) * torch.rand(64, 1) * 3  # down [d, n]
    w[5, 32:64] = 0.25  # a constant block
    rows = fmt.quantize(w)  # blocks along the neurons, as the GGUF stores down
    codes, table = columns_from_rows(rows, fmt)
    assert codes.shape == (96, fmt.column_code_bytes(64)) and table.shape == (3, fmt.head_bytes // 2, 64)
    want = fmt.dequantize(rows, 96).t()  # [n, d]
    ids = torch.tensor([95, 0, 40, 33, 64, 40, 7])  # out of order, a repeat, three blocks
    got = dequantize_columns_reference(codes[ids], table, ids, fmt)
    assert torch.equal(got, want[ids])
    assert torch.equal(dequantize_columns_reference(codes, table, torch.arange(96), fmt), want)
    if cpu_kernels():
        assert torch.equal(dequantize_columns(codes[ids], table, ids, fmt), want[ids])
        assert torch.equal(dequantize_columns(codes[ids], table, ids, fmt, torch.bfloat16), want[ids].bfloat16())


KERNEL_CHECK = r"""
import json, sys, torch
from partinfer.runtime.native import (compact_kernel_path, cpu_kernels, down_columns, gemv, prompt_gemm_available,
                                      q4_1_columns_gemm, rows_gemm)
assert cpu_kernels()
from partinfer.common.formats.blocks import BLOCK_FORMATS, Q4_1
from partinfer.runtime.quant import (columns_from_rows, dequantize, dequantize_columns, dequantize_columns_reference,
                                     quantize_activation)
torch.manual_seed(0)
worst = {"fp32": 0.0, "bf16": 0.0, "down": 0.0}
unequal = []  # de-quantized tiles that differ from the reference's values in any bit


def per_block(v):  # one 8-bit scale for a block's activations, rounded as the kernel rounds
    d = v.abs().max() / 127
    return (v * (1.0 / d)).round() * d if d != 0 else v * 0
for fmt in (BLOCK_FORMATS["Q4_1"], BLOCK_FORMATS["Q8_0"]):
    for rows, cols in [(1, 32), (7, 32), (45, 576), (130, 1536)]:  # odd row counts: every thread's share has a tail
        w = fmt.quantize(torch.randn(rows, cols))
        x = torch.randn(cols)
        ref = fmt.dequantize(w, cols).double() @ quantize_activation(x).double()
        ref16 = fmt.dequantize(w, cols).double() @ quantize_activation(x.bfloat16().float()).double()
        for dtype in (torch.float32, torch.bfloat16):
            if not torch.equal(dequantize(w, fmt, cols, dtype), fmt.dequantize(w, cols).to(dtype)):
                unequal.append(f"{fmt.name} rows {rows}x{cols} {dtype}")
        pick = torch.tensor([rows - 1, 0, rows // 2, rows - 1])  # a subset, out of order, with a repeat
        for kind, got, want in [("fp32", gemv(w, x), ref), ("fp32", gemv(w, x, pick), ref[pick]),
                                ("bf16", gemv(w, x.bfloat16()), ref16)]:
            error = (got.double() - want).abs().max().item() / (want.abs().max().item() + 1e-9)
            worst[kind] = max(worst[kind], error)
    for d, n in [(32, 32), (64, 96), (576, 1536)]:  # down [d, n]: one block; three; the default model's
        codes, table = columns_from_rows(fmt.quantize(torch.randn(d, n)), fmt)
        ids = torch.randperm(n)[: max(1, n * 2 // 3)]  # a loaded set, hot-first order
        for dtype in (torch.float32, torch.bfloat16):
            want = dequantize_columns_reference(codes[ids], table, ids, fmt).to(dtype)
            if not torch.equal(dequantize_columns(codes[ids], table, ids, fmt, dtype), want):
                unequal.append(f"{fmt.name} columns {d}x{n} {dtype}")
        picks = [None, torch.tensor([len(ids) - 1, 0, len(ids) // 2, len(ids) - 1, 1])]  # all; out of order, a repeat
        for pick in picks:
            chosen = ids if pick is None else ids[pick]
            a = torch.randn(len(chosen))
            blocks = chosen // 32
            values = dequantize_columns_reference(codes[chosen], table, chosen, fmt).double()  # d q + m
            mins = table[blocks][:, 1].double() if fmt is Q4_1 else torch.zeros_like(values)
            a_q = a.clone()  # Q4_1 codes are summed in integers: a quantized to 8 bits per block of neurons
            for block in blocks.unique() if fmt is Q4_1 else []:
                mine = blocks == block
                a_q[mine] = per_block(a[mine])
            want = a_q.double() @ (values - mins) + a.double() @ mins
            got = down_columns(codes[ids].contiguous(), table, (ids // 32).contiguous(), a, pick)
            worst["down"] = max(worst["down"], (got.double() - want).abs().max().item() / (want.abs().max().item() + 1e-9))
if prompt_gemm_available():  # a prompt's Q4_1 product in integers: token and row tails, rows with a stride
    worst["gemm"] = 0.0
    for tokens, rows, cols in [(1, 1, 32), (5, 17, 64), (13, 37, 576), (70, 130, 1536)]:
        pairs = torch.stack([Q4_1.quantize(torch.randn(rows, cols)), Q4_1.quantize(torch.randn(rows, cols))], dim=1)
        x = torch.randn(tokens, cols)
        for j in (0, 1):  # every other row of gate/up pairs, read in place
            want = quantize_activation(x).double() @ Q4_1.dequantize(pairs[:, j].contiguous(), cols).double().t()
            got = rows_gemm(pairs[:, j], x, "q4_1")
            worst["gemm"] = max(worst["gemm"], (got.double() - want).abs().max().item() / want.abs().max().item())
        bias = torch.randn(rows)  # a bf16 prompt, with a bias: the output rounded to bf16
        want = quantize_activation(x.bfloat16().float()).double() @ Q4_1.dequantize(pairs[:, 0].contiguous(), cols).double().t()
        got = rows_gemm(pairs[:, 0], x.bfloat16(), "q4_1", bias)
        worst["bf16"] = max(worst["bf16"], (got.double() - want - bias.double()).abs().max().item() / want.abs().max().item())
    worst["columns"] = 0.0
    for tokens, d, n, loaded in [(1, 32, 32, 32), (5, 64, 96, 70), (70, 576, 1536, 1075)]:  # a loaded set out of order
        codes, table = columns_from_rows(Q4_1.quantize(torch.randn(d, n)), Q4_1)
        ids = torch.randperm(n)[:loaded]
        a = torch.randn(tokens, loaded)
        a_q = a.clone()  # 8-bit activations per block of neurons, both terms
        for block in (ids // 32).unique():
            mine = ids // 32 == block
            unit = a[:, mine].abs().amax(1, keepdim=True) / 127
            a_q[:, mine] = (a[:, mine] / unit).round() * unit
        want = a_q.double() @ dequantize_columns_reference(codes[ids], table, ids, Q4_1).double()
        got = q4_1_columns_gemm(codes[ids].contiguous(), table, (ids // 32).contiguous(), a)
        worst["columns"] = max(worst["columns"], (got.double() - want).abs().max().item() / want.abs().max().item())
print(json.dumps({"path": compact_kernel_path(), "worst": worst, "unequal": unequal}))
"""


def run_kernel_check(env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], capture_output=True, text=True, env={**os.environ, **env},
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_kernels
@pytest.mark.parametrize("path", ["avx2", "avx512-vnni"])
def test_compact_gemv_equals_dequantize_then_matmul(path):
    """Each compiled path (AVX2; AVX-512 VNNI where the CPU has it) equals de-quantizing the weights and the
    8-bit input, then an fp64 matmul: all rows, a row subset, a bf16 input, tails of blocks and of rows.
    Its de-quantizers (AVX2; AVX-512 BF16 where the CPU has it) give the reference's values bit for bit;
    on both paths a prompt's Q4_1 products in integers (rows, and down columns of a loaded set out of
    order) equal the same fp64 products of 8-bit inputs."""
    if path == "avx512-vnni" and not {"avx512_vnni", "avx512vl"} <= cpu_flags():
        pytest.skip("this CPU has no AVX-512 VNNI")
    result = run_kernel_check({"PARTINFER_VNNI": "1" if path == "avx512-vnni" else "0"})
    assert result["path"] == path
    assert result["worst"]["fp32"] < 1e-5  # fp32 sums in another order
    assert result["worst"]["bf16"] < 1e-2  # the output rounded to bf16
    assert result["worst"]["down"] < 1e-5  # down columns: fp32 sums in another order
    assert result["unequal"] == []
    assert result["worst"]["gemm"] < 1e-5
    assert result["worst"]["columns"] < 1e-5


def test_quantize_activation_is_what_kernels_multiply():
    x = torch.randn(4, 64)
    q = quantize_activation(x)
    blocks = (q.reshape(4, 2, 32) / (x.reshape(4, 2, 32).abs().amax(-1, keepdim=True) / 127))
    assert torch.allclose(blocks, blocks.round(), atol=1e-3) and (q - x).abs().max() < x.abs().max() / 127


@pytest.fixture(scope="module")
def compact(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compact")
    neurons = make_neuron_file(tiny_llama_dir, root / "model.safetensors")
    return {"neurons": neurons, "q4": pack_checkpoint(tiny_llama_dir, neurons, root / "q4", "q4"),
            "int8": pack_checkpoint(tiny_llama_dir, neurons, root / "int8", "int8")}


def load(model_dir, neurons, dtype=torch.float32, weights=None, **kwargs):
    return load_model(model_dir, dtype, "cpu", SparsityConfig(model_neurons=neurons, **kwargs), weights)


@pytest.mark.parametrize("weights", ["q4", "int8"])
@pytest.mark.parametrize("method", METHODS)
def test_phi_gamma_one_gives_dense_tokens_of_the_same_weights(compact, weights, method):
    """Batches (eager) in fp32, and one sequence at a time in bf16 (the compiled decode where built)."""
    dense = load(compact[weights], compact["neurons"], method="dense")
    model = load(compact[weights], compact["neurons"], method=method, gamma=1.0, phi=1.0, delta=0.3, start_num=0, end_num=3)
    prompts = tiny_prompts(4, seed=3)
    assert generate(model, prompts, 12).tokens == generate(dense, prompts, 12).tokens
    dense16 = load(compact[weights], compact["neurons"], torch.bfloat16, method="dense")
    model16 = load(compact[weights], compact["neurons"], torch.bfloat16, method=method, gamma=1.0, phi=1.0, delta=0.3,
                   start_num=0, end_num=3)
    for prompt in prompts[:2]:
        assert generate(model16, [prompt], 12).tokens == generate(dense16, [prompt], 12).tokens


@pytest.mark.parametrize("method", ["dense", "load-only", "partinfer", "tokenwise"])
def test_compiled_decode_equals_eager_on_compact_rows(compact, method):
    """The one-op decode on compact rows (ROWS and TOKENWISE kinds) against the eager forward of the same
    weights: logits agree up to the 8-bit input quantization of the kernels."""
    from partinfer.runtime.decode import EagerDecode
    from partinfer.runtime.model import KVCache, decode_step, prefill

    if not cpu_kernels():
        pytest.skip("no compiled CPU kernels on this machine")
    logits = []
    for eager in (False, True):
        model = load(compact["q4"], compact["neurons"], torch.bfloat16, method=method, gamma=0.7, delta=0.3, phi=0.4)
        if eager:
            model.backend = EagerDecode()
        cache = KVCache(model.cfg, 1, 64, torch.bfloat16, "cpu")
        prefill(model, torch.tensor([tiny_prompts(1, seed=4)[0]]), cache)
        steps = [decode_step(model, torch.tensor([t]), cache).float() for t in (5, 9, 17)]
        logits.append(torch.stack(steps))
    compiled, eager = logits
    assert (compiled - eager).abs().max() < 0.05 * eager.abs().max()


@pytest.mark.parametrize("weights", ["q4", "int8"])
def test_compact_partial_load_reads_only_the_packed_prefix(compact, weights):
    sparsity = SparsityConfig(method="load-only", gamma=0.3, delta=0.3, phi=0.3, model_neurons=compact["neurons"],
                              start_num=1, end_num=2)
    part = load_model(compact[weights], torch.float32, "cpu", sparsity)
    n = part.cfg.ffn_dim
    k = fraction_count(0.3, n)
    with CheckpointReader(compact[weights]) as reader:
        sizes = {name: reader.file(name).header[name]["data_offsets"] for name in reader.shards}
        bundle_row = reader.file("model.layers.1.mlp.bundle").shape("model.layers.1.mlp.bundle")[1]
    total = sum(end - start for start, end in sizes.values())  # every byte of every tensor
    skipped = 2 * (n - k) * bundle_row  # the unloaded rows of the two sparse layers' bundles
    start, end = sizes["model.embed_tokens.weight"]
    skipped += end - start  # an untied compact embedding stays on disk, read per token
    assert part.checkpoint_bytes_read == total - skipped
    layer = sparse_modules(part)[0]
    assert isinstance(layer, CompactSparseFFN) and layer.gate_up.dtype == torch.uint8 and layer.n_loaded == k


def test_compact_pack_is_smaller_and_close_to_bf16(compact, tiny_llama_dir):
    """q4 and int8 dense logits stay near the fp32 model's (the quantization error of random weights)."""
    from partinfer.runtime.model import KVCache, prefill

    ref = load(tiny_llama_dir, compact["neurons"], method="dense")
    prompt = torch.tensor([tiny_prompts(1, seed=2)[0]])
    want = prefill(ref, prompt, KVCache(ref.cfg, 1, 64, torch.float32, "cpu"), logits_for="all")
    for weights, tol in (("int8", 0.05), ("q4", 0.5)):
        model = load(compact[weights], compact["neurons"], method="dense")
        got = prefill(model, prompt, KVCache(model.cfg, 1, 64, torch.float32, "cpu"), logits_for="all")
        assert (got - want).abs().max() < tol * want.abs().max(), weights
    sizes = {w: sum(f.stat().st_size for f in compact[w].glob("*.safetensors")) for w in ("q4", "int8")}
    assert sizes["q4"] < sizes["int8"]


def test_weights_option_packs_once_and_refuses_a_mismatch(compact, tiny_llama_dir, tmp_path, monkeypatch):
    from partinfer.common.errors import PartinferError

    monkeypatch.setenv("PARTINFER_HOME", str(tmp_path))
    model = load(tiny_llama_dir, compact["neurons"], method="load-only", weights="int8")
    assert sparse_modules(model)[0].gate_up.dtype == torch.uint8
    assert len(list((tmp_path / "packed").iterdir())) == 1
    load(tiny_llama_dir, compact["neurons"], method="dense", weights="int8")  # the same copy, reused
    assert len(list((tmp_path / "packed").iterdir())) == 1
    with pytest.raises(PartinferError, match="packed with q4 weights"):
        load(compact["q4"], compact["neurons"], method="dense", weights="int8")


def test_an_older_compact_pack_is_refused_and_the_cached_one_rebuilt(compact, tiny_llama_dir, tmp_path, monkeypatch):
    """A version-1 compact pack (down rows per neuron) is a one-line error to load; `--weights` replaces its
    own cached copy of that age instead of misreading it."""
    import shutil

    from partinfer.common.errors import PartinferError
    from partinfer.common.formats.pack_format import PACK_MANIFEST, PackManifest
    from partinfer.runtime.pack import cached_pack

    def stale_compact_pack(pack: Path) -> bool:
        return PackManifest.read(pack).stale

    def age(pack: Path) -> None:
        manifest = json.loads((pack / PACK_MANIFEST).read_text())  # as version 1 wrote it: no digests
        old = {k: v for k, v in manifest.items() if k not in ("manifest_sha256", "file_digests")}
        (pack / PACK_MANIFEST).write_text(json.dumps({**old, "version": 1}))

    old = shutil.copytree(compact["q4"], tmp_path / "old")
    age(old)
    with pytest.raises(PartinferError, match="older layout.*pack it again"):
        load(old, compact["neurons"], method="dense")
    monkeypatch.setenv("PARTINFER_HOME", str(tmp_path / "home"))
    cached = cached_pack(tiny_llama_dir, compact["neurons"], "q4").path
    age(cached)
    assert stale_compact_pack(cached)
    assert cached_pack(tiny_llama_dir, compact["neurons"], "q4").path == cached and not stale_compact_pack(cached)
    load(tiny_llama_dir, compact["neurons"], method="dense", weights="q4")


def flip_bytes(path: Path, offset_from_end: int, count: int) -> None:
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, 2)
        data = bytearray(f.read(count))
        f.seek(-offset_from_end, 2)
        f.write(bytes(b ^ 0x5A for b in data))


def test_a_damaged_pack_is_an_error_and_a_damaged_cached_pack_is_rebuilt(compact, tiny_llama_dir, tmp_path, monkeypatch):
    """Flipped bytes inside a layer's bundle: a user's pack is a one-line error naming the file; the
    cached copy `--weights` made is packed again and gives the same tokens as before. A truncated cached
    file is rebuilt too, and an unchanged pack is hashed once, not on every load."""
    import shutil

    import partinfer.common.integrity as integrity
    from partinfer.common.errors import PartinferError
    from partinfer.runtime.pack import cached_pack

    monkeypatch.setenv("PARTINFER_HOME", str(tmp_path / "home"))
    mine = shutil.copytree(compact["q4"], tmp_path / "mine")
    load(mine, compact["neurons"], method="dense")
    flip_bytes(mine / "layer-001.safetensors", 2000, 1000)
    with pytest.raises(PartinferError, match=r"layer-001.safetensors is damaged.*partinfer pack"):
        load(mine, compact["neurons"], method="dense")

    prompts = tiny_prompts(2, seed=3)
    before = generate(load(tiny_llama_dir, compact["neurons"], method="partinfer", weights="q4"), prompts, 4).tokens
    cached = cached_pack(tiny_llama_dir, compact["neurons"], "q4").path
    flip_bytes(cached / "layer-002.safetensors", 3000, 2000)
    after = generate(load(tiny_llama_dir, compact["neurons"], method="partinfer", weights="q4"), prompts, 4).tokens
    assert after == before
    assert cached_pack(tiny_llama_dir, compact["neurons"], "q4").intact
    with open(cached / "rest.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    load(tiny_llama_dir, compact["neurons"], method="dense", weights="q4")
    assert cached_pack(tiny_llama_dir, compact["neurons"], "q4").intact

    hashed = []
    monkeypatch.setattr(integrity, "file_sha256", lambda path: hashed.append(path) or pytest.fail("hashed again"))
    load(tiny_llama_dir, compact["neurons"], method="dense", weights="q4")  # unchanged since checked: no hashing
    assert hashed == []


def test_embedded_model_q4_pack_keeps_the_gguf_blocks(default_model_dir, tmp_path):
    """Packing the embedded model with q4 reproduces the GGUF's de-quantized gate, up, down and attention
    values exactly (gguf-py's own de-quantizer as the reference), and its bf16 checkpoint after rounding."""
    import gguf
    import gguf.quants

    from partinfer.runtime.defaults import shipped_model_neurons
    from partinfer.runtime.prepare import default_gguf_path

    out = pack_checkpoint(default_model_dir, shipped_model_neurons(None), tmp_path / "q4", "q4")
    source = {t.name: t for t in gguf.GGUFReader(default_gguf_path()).tensors}

    def gguf_values(name: str) -> torch.Tensor:
        t = source[name]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))

    d = 576
    with CheckpointReader(out) as packed, CheckpointReader(default_model_dir) as plain:
        for layer in (0, 17, 29):
            perm = packed.get(f"model.layers.{layer}.mlp.perm").long()
            bundle = packed.get(f"model.layers.{layer}.mlp.bundle")  # [n, gate | up | down_t]
            g = Q4_1.row_bytes(d)
            assert torch.equal(Q4_1.dequantize(bundle[:, :g], d), gguf_values(f"blk.{layer}.ffn_gate.weight")[perm])
            assert torch.equal(Q4_1.dequantize(bundle[:, g : 2 * g], d), gguf_values(f"blk.{layer}.ffn_up.weight")[perm])
            table = packed.get(f"model.layers.{layer}.mlp.down_table")
            down = dequantize_columns_reference(bundle[:, 2 * g :], table, perm, Q4_1)  # per-neuron codes + block scales
            assert torch.equal(down, gguf_values(f"blk.{layer}.ffn_down.weight").t()[perm])
            for proj, name in (("v_proj", "attn_v"), ("o_proj", "attn_output")):
                got = Q4_1.dequantize(packed.get(f"model.layers.{layer}.self_attn.{proj}.weight"), d)
                assert torch.equal(got, gguf_values(f"blk.{layer}.{name}.weight"))
            for proj in ("q_proj", "k_proj"):  # llama.cpp interleaves their rows; the pack restores HF order
                got = Q4_1.dequantize(packed.get(f"model.layers.{layer}.self_attn.{proj}.weight"), d)
                assert torch.equal(got.bfloat16(), plain.get(f"model.layers.{layer}.self_attn.{proj}.weight"))
        embedding = BLOCK_FORMATS["Q8_0"].dequantize(packed.get("model.embed_tokens.weight"), d)
        assert torch.equal(embedding, gguf_values("token_embd.weight"))


def test_pareto_grid_writes_table_and_chart(tiny_with_tokenizer, tmp_path, monkeypatch):
    """`partinfer pareto` on a tiny model: every configuration scored (perplexity and MC2), dense bf16 the
    reference, memory growing with γ, compact formats smaller, a PNG written; a bad budget fails before
    any output."""
    import json as _json

    from partinfer.common.errors import PartinferError
    from partinfer.evaluation.pareto import run_pareto
    from tests.helpers import write_offline_data

    monkeypatch.setenv("PARTINFER_HOME", str(tmp_path / "home"))
    write_offline_data(tmp_path / "home")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"The river {i} runs past the old mill and the town of {i * 7} people." * 3 for i in range(6)))
    neurons = tiny_with_tokenizer / "neurons.safetensors"
    report = run_pareto(tiny_with_tokenizer / "model", ("load-only", "tokenwise"), (0.5, 1.0), ("int8",),
                        SparsityConfig(model_neurons=neurons, start_num=0, end_num=3), tmp_path / "out", str(text),
                        num_samples=2, prompt_tokens=8, cont_tokens=8, dtype="fp32", task="partinfer_truthfulqa_mc2", task_limit=2)
    points = report["points"]
    assert len(points) == 2 * (1 + 2 * 2)  # bf16 added as the reference; dense + 2 methods x 2 γ per format
    assert points[0]["method"] == "dense" and points[0]["weights"] == "bf16" and points[0]["ratio"] == 1.0
    by = {(p["method"], p["weights"], p["gamma"]): p for p in points}
    assert by[("load-only", "bf16", 0.5)]["weights_mib"] < by[("load-only", "bf16", 1.0)]["weights_mib"]
    assert by[("load-only", "int8", 1.0)]["weights_mib"] < by[("load-only", "bf16", 1.0)]["weights_mib"]
    assert abs(by[("load-only", "bf16", 1.0)]["ratio"] - 1.0) < 1e-4  # γ = 1 loads everything: dense
    assert points[0]["score_ratio"] == 1.0 and all(0 <= p["score"] <= 1 for p in points)
    assert all(p["score_stderr"] is not None and p["score_stderr"] >= 0 for p in points)
    assert abs(by[("load-only", "bf16", 1.0)]["score"] - points[0]["score"]) < 1e-4
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _json.loads((tmp_path / "out" / "pareto.json").read_text())["points"] == points
    assert "| load-only | int8 | 0.50 |" in (tmp_path / "out" / "pareto.md").read_text()
    assert "TruthfulQA MC2 on 2 questions" in (tmp_path / "out" / "pareto.md").read_text()
    with pytest.raises(PartinferError):
        run_pareto(tiny_with_tokenizer / "model", ("partinfer",), (0.5,), ("q5",), SparsityConfig(model_neurons=neurons),
                   tmp_path / "out2", str(text))
    assert not (tmp_path / "out2").exists()


def random_k_blocks(fmt, rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Real blocks of a GGUF format (the K-quants, and Q5_0/Q8_0 that a Q4_K_M file falls back to): random
    codes and packed scales, finite fp16 scales."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (rows, k // fmt.block, fmt.block_bytes), dtype=torch.uint8, generator=g)
    scales = (torch.rand(rows, k // fmt.block, 2, generator=g) * 0.02).half().view(torch.uint8)  # [.., 2 fp16] -> 4 bytes
    scales = scales.reshape(rows, k // fmt.block, 4)
    if fmt.name in ("Q4_K", "Q4_1"):  # d, then dmin (m)
        blocks[..., 0:4] = scales
    elif fmt.name == "Q6_K":  # d is the last fp16
        blocks[..., -2:] = scales[..., :2]
    else:  # Q5_0, Q8_0: d first
        blocks[..., 0:2] = scales[..., :2]
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_k_quants_equal_gguf_py_on_random_blocks(name):
    """Q4_K and Q6_K (what a Q4_K_M GGUF holds) de-quantize to gguf-py's values exactly; down split into
    per-neuron columns keeps every value, for any subset and order of neurons."""
    import gguf.quants

    fmt = BLOCK_FORMATS[name]
    rows = random_k_blocks(fmt, 24, 512)
    theirs = gguf.quants.dequantize(rows.numpy(), getattr(gguf.GGMLQuantizationType, name))
    want = torch.from_numpy(theirs.astype(np.float32))
    assert torch.equal(fmt.dequantize(rows, 512), want)
    if cpu_kernels():  # the compiled de-quantizer: the same values, fp32 and bf16
        assert torch.equal(dequantize(rows, fmt, 512), want)
        assert torch.equal(dequantize(rows[3:9], fmt, 512, torch.bfloat16), want[3:9].bfloat16())
    head, codes = fmt.split(rows.reshape(24, 2, fmt.block_bytes))
    assert torch.equal(fmt.join(head, fmt.pack(fmt.unpack(codes))).reshape(24, -1), rows)  # codes round-trip
    down = random_k_blocks(fmt, 512, 768, seed=1)  # down [d 512, n 768]: blocks run across 256 neurons
    codes, table = columns_from_rows(down, fmt)
    assert codes.shape == (768, fmt.column_code_bytes(512)) and table.shape == (3, fmt.head_bytes // 2, 512)
    ids = torch.tensor([767, 0, 300, 256, 255, 300, 17])  # out of order, a repeat, every block
    values = fmt.dequantize(down, 768).t()  # [n, d]
    assert torch.equal(dequantize_columns_reference(codes[ids], table, ids, fmt), values[ids])
    assert torch.equal(dequantize_columns(codes[ids], table, ids, fmt), values[ids])  # compiled where built
    assert torch.equal(dequantize_columns(codes[ids], table, ids, fmt, torch.bfloat16), values[ids].bfloat16())
    assert torch.equal(rows_from_columns(codes, table, fmt), down)  # and back: the source's rows, byte for byte


def test_prompts_pass_through_the_layers_at_the_prompt_products_length(tiny_llama_dir, compact):
    """Compact rows whose compiled prompt products take a prompt (K-quants; Q4_1 with AVX-512 VNNI) pass
    128 tokens at a time, as those products run anyway; float weights keep the longer default pass."""
    from partinfer.common.formats.blocks import BLOCK_FORMATS
    from partinfer.runtime.kernels import K_PRODUCT_TOKENS, prompt_chunk_tokens
    from partinfer.runtime.model import PREFILL_CHUNK_TOKENS
    from partinfer.runtime.native import prompt_gemm_available

    assert prompt_chunk_tokens(None) is None and prompt_chunk_tokens(BLOCK_FORMATS["Q8_0"]) is None
    assert prompt_chunk_tokens(BLOCK_FORMATS["Q4_K"]) == K_PRODUCT_TOKENS
    q4 = K_PRODUCT_TOKENS if prompt_gemm_available() else None
    assert prompt_chunk_tokens(BLOCK_FORMATS["Q4_1"]) == q4
    assert load(tiny_llama_dir, compact["neurons"]).prefill_chunk_tokens == PREFILL_CHUNK_TOKENS
    assert load(compact["q4"], compact["neurons"]).prefill_chunk_tokens == (q4 or PREFILL_CHUNK_TOKENS)
