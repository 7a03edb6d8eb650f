"""Formats as data: a new block format is one registry entry (no loader, pack or FFN code changes), every
compact tensor carries its format by name, and one load reads each neuron file and the manifest once."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from partinfer.cli.app import app
from partinfer.common.errors import PartinferError
from partinfer.common.formats import blocks
from partinfer.common.formats.blocks import BlockFormat, WeightScheme, f16, fp16_head
from partinfer.common.formats.pack_format import PACK_MANIFEST, PackManifest, manifest_digest
from partinfer.common.neuron_file import NeuronFile
from partinfer.runtime.decode import EagerDecode
from partinfer.runtime.generate import generate
from partinfer.runtime.loader import load_model
from partinfer.runtime.pack import pack_checkpoint
from partinfer.runtime.sparse_ffn import sparse_modules
from partinfer.runtime.sparsity import SparsityConfig
from tests.helpers import make_neuron_file, tiny_prompts


def _u8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A test format: per 16 weights 16 unsigned codes, then one fp16 scale d; w = d·(q - 128)."""
    d = x.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return fp16_head(d), (x * inv).round().clamp(-127, 127) + 128


U8 = BlockFormat("U8_TEST", 16, 18, 2, split=lambda b: (b[..., 16:], b[..., :16]),
                 join=lambda head, codes: torch.cat([codes, head], dim=-1), unpack=lambda c: c.float(),
                 pack=lambda q: q.to(torch.uint8), values=lambda h, q, pos: f16(h, 0) * (q - 128),
                 quantize_blocks=_u8_quantize, kernel=None)


@pytest.fixture
def u8_format(monkeypatch):
    """The test format, registered as a block format and as a weight scheme, for this test only."""
    monkeypatch.setitem(blocks.BLOCK_FORMATS, U8.name, U8)
    monkeypatch.setitem(blocks.WEIGHT_SCHEMES, "u8", WeightScheme("u8", U8.name, U8.name, U8.name, U8.name))
    return U8


@pytest.fixture(scope="module")
def neurons(tiny_llama_dir, tmp_path_factory):
    return make_neuron_file(tiny_llama_dir, tmp_path_factory.mktemp("nf") / "model.safetensors")


def test_a_new_block_format_is_one_registry_entry(u8_format, tiny_llama_dir, neurons, tmp_path):
    """Packed, loaded and generated with by every method through the eager reference path alone; the
    manifest names the format for every compact matrix; φ = γ = 1 gives the dense tokens."""
    packed = pack_checkpoint(tiny_llama_dir, neurons, tmp_path / "u8", "u8")
    manifest = PackManifest.read(packed)
    assert manifest.weights == "u8" and set(manifest.tensor_formats.values()) == {"U8_TEST"}
    assert manifest.format_of("model.layers.0.mlp.down_proj.weight") is U8
    prompts = tiny_prompts(2, seed=4)
    ref = load_model(tiny_llama_dir, torch.float32, "cpu")
    dense = load_model(packed, torch.float32, "cpu")
    assert isinstance(dense.backend, EagerDecode)  # no kernels for this format: eager
    assert dense.layers[0].self_attn.qkv_proj.fmt is U8 and dense.embed_tokens.fmt is U8
    # 8-bit codes of random weights: logits near the float model's
    from partinfer.runtime.model import KVCache, prefill

    ids = torch.tensor([prompts[0]])
    want = prefill(ref, ids, KVCache(ref.cfg, 1, 32, torch.float32, "cpu"), logits_for="all")
    got = prefill(dense, ids, KVCache(dense.cfg, 1, 32, torch.float32, "cpu"), logits_for="all")
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    dense_tokens = generate(dense, prompts, 6).tokens
    for method in ("load-only", "partinfer", "tokenwise", "static", "coreinfer"):
        full = SparsityConfig(method=method, gamma=1.0, delta=0.3 if method != "load-only" else 1.0, phi=1.0,
                              model_neurons=neurons, start_num=0, end_num=3)
        model = load_model(packed, torch.float32, "cpu", full)
        assert sparse_modules(model)[0].gate_up_format is U8 if method != "tokenwise" else True
        assert generate(model, prompts, 6).tokens == dense_tokens, method
    sparse = load_model(packed, torch.bfloat16, "cpu", SparsityConfig(method="tokenwise", model_neurons=neurons))
    assert isinstance(sparse.backend, EagerDecode) and len(generate(sparse, prompts[:1], 4).tokens[0]) == 4


def test_an_unknown_format_in_a_manifest_is_a_one_line_error(u8_format, tiny_llama_dir, neurons, tmp_path, monkeypatch):
    packed = pack_checkpoint(tiny_llama_dir, neurons, tmp_path / "u8", "u8")
    monkeypatch.delitem(blocks.BLOCK_FORMATS, U8.name)  # as read by a version that does not know it
    with pytest.raises(PartinferError, match="unknown weight block format 'U8_TEST'.*pack it again"):
        load_model(packed, torch.float32, "cpu")


def test_the_format_is_never_guessed_from_a_size(tiny_llama_dir, neurons, tmp_path):
    """Q4_1 and a format with the same bytes per weight would be confused by a size rule; rows are read
    in the format the manifest names, and a manifest without formats is refused, not guessed."""
    packed = pack_checkpoint(tiny_llama_dir, neurons, tmp_path / "q4", "q4")
    manifest = json.loads((packed / PACK_MANIFEST).read_text())
    del manifest["tensor_formats"]["model.layers.0.self_attn.q_proj.weight"]
    (packed / PACK_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PartinferError, match="partinfer_pack.json is damaged"):  # an edit is refused by the digest
        load_model(packed, torch.float32, "cpu")
    manifest["manifest_sha256"] = manifest_digest(manifest)  # signed again: the format check behind it
    (packed / PACK_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PartinferError, match="different formats"):
        load_model(packed, torch.float32, "cpu")


def test_one_generate_reads_the_neuron_file_and_the_manifest_once(tiny_with_tokenizer, tmp_path, monkeypatch):
    """`generate --weights q4` (first run: it packs; second: it reuses) opens the model-level neuron file
    once and the pack's manifest once."""
    monkeypatch.setenv("PARTINFER_HOME", str(tmp_path / "home"))
    neurons = tiny_with_tokenizer / "neurons.safetensors"
    loads, reads = Counter(), Counter()
    load, read = NeuronFile.load.__func__, PackManifest.read.__func__

    def counting_load(cls, path, fingerprint=None):
        loads[Path(path).resolve()] += 1
        return load(cls, path, fingerprint)

    def counting_read(cls, model_dir):
        found = read(cls, model_dir)
        if found is not None:
            reads[Path(model_dir).resolve()] += 1
        return found

    monkeypatch.setattr(NeuronFile, "load", classmethod(counting_load))
    monkeypatch.setattr(PackManifest, "read", classmethod(counting_read))
    for run in ("packs", "reuses"):
        loads.clear()
        reads.clear()
        done = CliRunner().invoke(app, ["generate", "--model", str(tiny_with_tokenizer / "model"), "--weights", "q4",
                                        "--model-neurons", str(neurons), "--start-num", "0", "--end-num", "3",
                                        "-p", "hi", "-n", "3", "--json"])
        assert done.exit_code == 0, done.output
        json.loads(done.stdout)  # stdout holds only JSON, even on the run that packs
        assert loads == {neurons.resolve(): 1}, run
        assert list(reads.values()) == [1], run  # the cached pack's manifest; the plain model has none


# ---- the pack cache serves only the weights it was made from ----


def _copy_with_other_weights(src: Path, dst: Path, seed: int) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    save_file({k: torch.randn(v.shape, generator=g).to(v.dtype) * 0.05 for k, v in tensors.items()},
              dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("weights", ["q4", "int8"])
def test_same_named_models_and_a_model_changed_in_place_get_their_own_packs(tiny_llama_dir, neurons, tmp_path,
                                                                           monkeypatch, weights):
    monkeypatch.setenv("PARTINFER_HOME", str(tmp_path / "home"))
    first = _copy_with_other_weights(tiny_llama_dir, tmp_path / "a" / "model", 1)
    second = _copy_with_other_weights(tiny_llama_dir, tmp_path / "b" / "model", 2)  # same directory name
    prompt = [tiny_prompts(1, seed=3)[0]]

    def tokens(model_dir):
        return generate(load_model(model_dir, torch.float32, "cpu", SparsityConfig(method="dense", model_neurons=neurons),
                                   weights), prompt, 8).tokens

    def packed_tokens_of(model_dir):  # the same weights packed apart: what the cache must serve
        out = pack_checkpoint(model_dir, neurons, tmp_path / f"own-{len(list(tmp_path.iterdir()))}", weights)
        return generate(load_model(out, torch.float32, "cpu"), prompt, 8).tokens

    assert tokens(first) == packed_tokens_of(first)
    assert tokens(second) == packed_tokens_of(second) != tokens(first)
    _copy_with_other_weights(tiny_llama_dir, tmp_path / "c", 3)
    import shutil

    shutil.copy2(tmp_path / "c" / "model.safetensors", first / "model.safetensors")  # changed in place
    assert tokens(first) == packed_tokens_of(first)
    assert len(list((tmp_path / "home" / "packed").iterdir())) == 3


def test_a_damaged_cache_entry_is_rebuilt_not_refused(tiny_llama_dir, neurons, tmp_path, monkeypatch):
    from partinfer.runtime.pack import cached_pack

    monkeypatch.setenv("PARTINFER_HOME", str(tmp_path / "home"))
    entry = cached_pack(tiny_llama_dir, neurons, "q4").path
    (entry / PACK_MANIFEST).write_text("{ truncated")
    assert cached_pack(tiny_llama_dir, neurons, "q4").path == entry
    assert PackManifest.read(entry).weights == "q4"
