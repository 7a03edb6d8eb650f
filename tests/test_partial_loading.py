"""Partial loading: only the loaded neurons are read, from packed and plain checkpoints."""

from __future__ import annotations

import pytest
import torch

from partinfer.common.neuron_file import NeuronFile
from partinfer.common.errors import PartinferError
from partinfer.runtime.generate import generate
from partinfer.runtime.loader import load_dense_model, load_model
from partinfer.runtime.pack import pack_checkpoint
from partinfer.runtime.sparse_ffn import SparseFFN
from partinfer.runtime.sparsity import SparsityConfig, fraction_count
from tests.helpers import make_neuron_file, tiny_prompts


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("partial")
    model_nf = make_neuron_file(tiny_llama_dir, root / "model.safetensors", seed=0)
    dataset_nf = make_neuron_file(tiny_llama_dir, root / "dataset.safetensors", seed=1, level="dataset")
    packed = pack_checkpoint(tiny_llama_dir, model_nf, root / "packed")
    return {"plain": tiny_llama_dir, "packed": packed, "model_nf": model_nf, "dataset_nf": dataset_nf, "root": root}


@pytest.mark.parametrize("layout", ["plain", "packed"])
@pytest.mark.parametrize("gamma", [1.0, 0.7, 0.3])
def test_partial_load_equals_slice_of_full_load(tiny, layout, gamma):
    full = load_dense_model(tiny["plain"], dtype=torch.float32)
    sparsity = SparsityConfig(method="load-only", gamma=gamma, delta=min(0.3, gamma), phi=gamma,
                              model_neurons=tiny["model_nf"], dataset_neurons=tiny["dataset_nf"], start_num=1, end_num=2)
    part = load_model(tiny[layout], torch.float32, "cpu", sparsity)
    full_state = full.state_dict()
    n = full.cfg.ffn_dim
    for i, block in enumerate(part.layers):
        if i in (1, 2):
            ffn = block.mlp
            assert isinstance(ffn, SparseFFN)
            ids = ffn.neuron_ids
            assert ids.shape[0] == fraction_count(gamma, n) and ids.unique().shape[0] == ids.shape[0]
            full_gate, full_up = full_state[f"layers.{i}.mlp.gate_up"].chunk(2)
            assert torch.equal(ffn.gate, full_gate[ids])
            assert torch.equal(ffn.up, full_up[ids])
            assert torch.equal(ffn.down, full_state[f"layers.{i}.mlp.down"][:, ids])
        else:
            assert not isinstance(block.mlp, SparseFFN)
    for name, tensor in part.state_dict().items():
        if not name.startswith(("layers.1.mlp.", "layers.2.mlp.")):  # everything but the sparse FFNs
            assert torch.equal(tensor, full_state[name]), name


def test_loaded_set_starts_with_base(tiny):
    cfg_nf = NeuronFile.load(tiny["model_nf"])
    sparsity = SparsityConfig(method="partinfer", gamma=0.7, delta=0.3, phi=0.4, model_neurons=tiny["model_nf"],
                              dataset_neurons=tiny["dataset_nf"])
    part = load_model(tiny["packed"], torch.float32, "cpu", sparsity)
    n = part.cfg.ffn_dim
    layers = [i for i, b in enumerate(part.layers) if isinstance(b.mlp, SparseFFN)]
    assert layers
    for i in layers:
        ids = part.layers[i].mlp.neuron_ids
        n_base = fraction_count(0.3, n)
        assert ids.shape[0] == fraction_count(0.7, n) and ids.unique().shape[0] == ids.shape[0]
        assert torch.equal(ids[:n_base], cfg_nf.rank(i)[:n_base].long().sort().values)  # the base, in id order


def test_gamma_one_gives_dense_tokens(tiny):
    dense = load_dense_model(tiny["plain"], dtype=torch.float32)
    sparsity = SparsityConfig(method="load-only", gamma=1.0, delta=0.3, phi=1.0, model_neurons=tiny["model_nf"])
    part = load_model(tiny["packed"], torch.float32, "cpu", sparsity)
    prompts = tiny_prompts(3, seed=5)
    assert generate(part, prompts, 12).tokens == generate(dense, prompts, 12).tokens


@pytest.mark.parametrize("kwargs, message", [
    (dict(gamma=0.0), "gamma"),
    (dict(gamma=1.5), "gamma"),
    (dict(gamma=0.2, delta=0.3, phi=0.2), "--delta 0.3 > --phi|--delta 0.3 > --gamma"),
    (dict(gamma=0.7, delta=0.5, phi=0.4), "--delta 0.5 > --phi 0.4"),
    (dict(gamma=0.3, delta=0.3, phi=0.4), "--phi 0.4 > --gamma 0.3"),
])
def test_bad_fractions(kwargs, message):
    with pytest.raises(PartinferError, match=message):
        SparsityConfig(method="partinfer", **kwargs)


def test_neuron_file_of_another_model(tiny, tmp_path):
    from tests.tiny_models import save_tiny_model

    other_dir = save_tiny_model("qwen2", tmp_path / "qwen2")
    other_nf = make_neuron_file(other_dir, tmp_path / "other.safetensors")
    with pytest.raises(PartinferError, match="was made for"):
        load_model(tiny["plain"], torch.float32, "cpu", SparsityConfig(model_neurons=other_nf))


def test_packed_permutation_mismatch(tiny):
    sparsity = SparsityConfig(model_neurons=tiny["dataset_nf"])  # not the file it was packed with
    with pytest.raises(PartinferError, match="permutation does not match"):
        load_model(tiny["packed"], torch.float32, "cpu", sparsity)


def test_missing_shard(tiny, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny["packed"], broken)
    (broken / "layer-002.safetensors").unlink()
    with pytest.raises(PartinferError, match="layer-002.safetensors is missing"):
        load_model(broken, torch.float32, "cpu", SparsityConfig(model_neurons=tiny["model_nf"]))


def test_partinfer_without_neuron_file(tiny):
    with pytest.raises(PartinferError, match="needs a neuron file"):
        load_model(tiny["plain"], torch.float32, "cpu", SparsityConfig(method="partinfer"))


def test_packed_partial_load_reads_only_loaded_rows(tiny):
    from partinfer.runtime.checkpoint import CheckpointReader

    sparsity = SparsityConfig(method="load-only", gamma=0.3, delta=0.3, phi=0.3, model_neurons=tiny["model_nf"],
                              start_num=1, end_num=2)
    part = load_model(tiny["packed"], torch.float32, "cpu", sparsity)
    n, d = part.cfg.ffn_dim, part.cfg.dim
    k = fraction_count(0.3, n)
    with CheckpointReader(tiny["packed"]) as reader:
        total = sum(torch.Size(reader.file(name).shape(name)).numel() * 4 for name in reader.shards
                    if not name.endswith(".perm"))  # every fp32 tensor of the checkpoint
        perms = sum(torch.Size(reader.file(name).shape(name)).numel() * 8 for name in reader.shards if name.endswith(".perm"))
    skipped = 2 * (n - k) * 3 * d * 4  # the unloaded rows of the two sparse layers' bundles
    assert part.checkpoint_bytes_read == total + perms - skipped
