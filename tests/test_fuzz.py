"""Property tests of the readers and the option parser: whatever the bytes or values, the answer is a
valid result or our one-line error (PartinferError / exit 2), never another exception."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from partinfer.common.neuron_file import NeuronFile
from partinfer.cli.app import app
from partinfer.common.errors import PartinferError
from partinfer.runtime.config import ModelConfig
from partinfer.common.safetensors_io import SafetensorsFile
from tests.helpers import make_neuron_file
from tests.test_cli import assert_clean_error

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


def file_with_header(tmp_path_factory, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def read_all(path: Path) -> None:
    f = SafetensorsFile(path)
    try:
        for name in f.keys():
            f.read(name)
    finally:
        f.close()


@FAST
@given(data=st.binary(max_size=256))
def test_safetensors_reader_on_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    path.write_bytes(data)
    try:
        read_all(path)
    except PartinferError:
        pass


@FAST
@given(header=st.dictionaries(st.text(max_size=5), json_values, max_size=4), data=st.binary(max_size=64))
def test_safetensors_reader_on_random_headers(tmp_path_factory, header, data):
    try:
        read_all(file_with_header(tmp_path_factory, header, data))
    except PartinferError:
        pass


@FAST
@given(dtype=st.sampled_from(["F32", "BF16", "I64", "U8", "F8", 3]),
       shape=st.lists(st.integers(-2, 5), max_size=3),
       offsets=st.lists(st.integers(-16, 80), min_size=0, max_size=3),
       data=st.binary(max_size=64))
def test_safetensors_reader_on_plausible_tensor_entries(tmp_path_factory, dtype, shape, offsets, data):
    header = {"t": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}
    try:
        read_all(file_with_header(tmp_path_factory, header, data))
    except PartinferError:
        return
    assert len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= len(data)  # accepted only when it is right


@pytest.fixture(scope="module")
def neuron_bytes(tiny_llama_dir, tmp_path_factory) -> bytes:
    return make_neuron_file(tiny_llama_dir, tmp_path_factory.mktemp("nf") / "model.safetensors").read_bytes()


@FAST
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6))
def test_neuron_file_reader_on_corrupted_files(tmp_path_factory, neuron_bytes, flips):
    data = bytearray(neuron_bytes)
    for position, value in flips:
        data[position % len(data)] = value
    path = tmp_path_factory.mktemp("nf") / "x.safetensors"
    path.write_bytes(bytes(data))
    try:
        nf = NeuronFile.load(path)
    except PartinferError:
        return
    for i in range(nf.n_layers):  # what is accepted is usable: finite statistics, a full ranking
        assert bool(nf.mean_abs(i).isfinite().all()) and len(set(nf.rank(i).tolist())) == nf.sum_abs[i].numel()


@FAST
@given(changes=st.dictionaries(st.sampled_from([
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "rms_norm_eps", "max_position_embeddings", "hidden_act", "rope_parameters",
    "rope_scaling", "rope_theta", "tie_word_embeddings", "sliding_window", "use_sliding_window"]), json_values,
    max_size=4))
def test_model_config_on_random_values(changes):
    config = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, **changes}
    try:
        cfg = ModelConfig.from_hf_dict(config)
    except PartinferError:
        return
    assert cfg.dim > 0 and cfg.n_layers > 0 and cfg.n_heads % cfg.n_kv_heads == 0 and math.isfinite(cfg.norm_eps)


NUMERIC_OPTIONS = {
    "--gamma": st.floats(allow_nan=True, allow_infinity=True), "--delta": st.floats(allow_nan=True),
    "--phi": st.floats(allow_nan=True), "--token-sparsity": st.floats(allow_nan=True),
    "--temperature": st.floats(allow_nan=True, allow_infinity=True), "--top-p": st.floats(allow_nan=True),
    "--max-new-tokens": st.integers(-2**80, 2**80), "--seed": st.integers(-2**80, 2**80),
    "--start-num": st.integers(-2**70, 2**70), "--end-num": st.integers(-2**70, 2**70),
}


@FAST
@given(values=st.dictionaries(st.sampled_from(sorted(NUMERIC_OPTIONS)),
                              st.one_of(st.floats(allow_nan=True), st.integers(-2**80, 2**80), st.text(max_size=4)),
                              min_size=1, max_size=4))
def test_option_parser_on_random_values(values):
    args = ["generate", "-p", "hi", "--model", "/no/such/model/dir"]
    for option, value in values.items():
        args += [option, str(value)]
    result = CliRunner().invoke(app, args)  # valid values get as far as the missing model, still exit 2
    assert_clean_error(result)


@pytest.mark.parametrize("kind", ["neuron", "compensation"])
def test_flipped_bytes_in_a_written_file_are_a_one_line_error(kind, tmp_path):
    """Files we write carry a content digest: 64 flipped bytes inside the tensor data are refused, not
    read as other values that still look finite."""
    from partinfer.common.compensation_file import Compensation
    from partinfer.common.errors import PartinferError
    from partinfer.common.neuron_file import NeuronFile

    if kind == "neuron":
        n = 64
        path = NeuronFile(sum_abs=[torch.rand(n, dtype=torch.float64) for _ in range(2)],
                          core_count=[torch.rand(n, dtype=torch.float64) for _ in range(2)], tokens=10, model="m",
                          fingerprint=f"llama-L2-d8-n{n}-v16", level="model", datasets=("x",), sequences=1,
                          gen_tokens=0, token_sparsity=0.2, core_score="abs").save(tmp_path / "f.safetensors")
        load = lambda p: NeuronFile.load(p)  # noqa: E731
    else:
        path = Compensation({0: torch.rand(8, 4)}, {0: torch.rand(4, 8)}, "llama-L2-d8-n64-v16", "abc", 4, 1e-3, 10,
                            ("x",)).save(tmp_path / "f.safetensors")
        load = lambda p: Compensation.load(p)  # noqa: E731
    load(path)  # a good file loads
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data)):  # the last tensor bytes: finite values, other numbers
        data[i] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(PartinferError, match="damaged"):
        load(path)


COMPENSATION_KEYS = ["format", "version", "fingerprint", "loaded", "rank", "ridge", "tokens", "datasets", "created", "layers"]


def compensation_file(path: Path, meta_changes: dict, a_shape=(8, 4), b_shape=(4, 8)) -> Path:
    """A compensation file whose metadata is changed as given, written with a digest that matches it (so the
    reader's checks behind the digest are what is exercised)."""
    from safetensors.torch import save_file

    from partinfer.common.compensation_file import Compensation
    from partinfer.common.safetensors_io import DIGEST_KEY, content_digest, read_whole_file

    good = Compensation({0: torch.rand(*a_shape)}, {0: torch.rand(*b_shape)}, "llama-L2-d8-n64-v16", "abc", 4, 1e-3, 10,
                        ("x",)).save(path)
    meta, tensors = read_whole_file(good)
    meta = {**{k: v for k, v in meta.items() if k != DIGEST_KEY}, **meta_changes}
    meta[DIGEST_KEY] = content_digest(meta, tensors)
    save_file(tensors, path, metadata=meta)
    return path


@FAST
@given(changes=st.dictionaries(st.sampled_from(COMPENSATION_KEYS), st.text(max_size=12) | st.builds(
    json.dumps, json_values), max_size=3),
       shapes=st.sampled_from([((8, 4), (4, 8)), ((8, 4), (3, 8)), ((8, 4), (4, 7)), ((8, 0), (0, 8))]))
def test_compensation_reader_on_random_metadata(tmp_path_factory, changes, shapes):
    from partinfer.common.compensation_file import Compensation

    path = compensation_file(tmp_path_factory.mktemp("comp") / "c.safetensors", changes, *shapes)
    try:
        comp = Compensation.load(path, fingerprint="llama-L2-d8-n64-v16")
    except PartinferError:
        return
    for i in comp.a:  # what is accepted is usable: matching shapes, finite values
        assert comp.a[i].shape[1] == comp.b[i].shape[0] and comp.a[i].shape[0] == comp.b[i].shape[1]
        assert bool(comp.a[i].isfinite().all()) and bool(comp.b[i].isfinite().all())


@FAST
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6))
def test_compensation_reader_on_corrupted_files(tmp_path_factory, flips):
    from partinfer.common.compensation_file import Compensation

    path = compensation_file(tmp_path_factory.mktemp("comp") / "c.safetensors", {})
    data = bytearray(path.read_bytes())
    for position, value in flips:
        data[position % len(data)] = value
    path.write_bytes(bytes(data))
    try:
        Compensation.load(path)
    except PartinferError:
        pass


@pytest.fixture(scope="module")
def packed_tiny(tiny_llama_dir, tmp_path_factory) -> dict:
    from partinfer.common.formats.pack_format import PACK_MANIFEST
    from partinfer.runtime.pack import pack_checkpoint

    root = tmp_path_factory.mktemp("pack")
    neurons = make_neuron_file(tiny_llama_dir, root / "model.safetensors")
    pack = pack_checkpoint(tiny_llama_dir, neurons, root / "q4", "q4")
    return {"pack": pack, "neurons": neurons, "manifest": json.loads((pack / PACK_MANIFEST).read_text())}


PACK_FIELDS = ["version", "weights", "fingerprint", "tensor_formats", "file_digests", "source_identity", "format", "files"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(PACK_FIELDS), json_values, min_size=1, max_size=3),
       format_change=st.one_of(st.none(), st.tuples(st.integers(0, 10**4), json_values | st.sampled_from(["Q8_0", "Q4_K"]))),
       signed=st.booleans())
@example(changes={"file_digests": {"": ""}}, format_change=None, signed=True)  # once a directory was hashed as a file
def test_pack_manifest_on_random_values(tmp_path_factory, packed_tiny, changes, format_change, signed):
    """A pack whose manifest fields hold random JSON: loading it is our one-line error or a model that runs.
    Unsigned edits are refused by the manifest's digest; signed ones (digest recomputed) reach the checks behind it."""
    import shutil

    from partinfer.common.formats.pack_format import PACK_MANIFEST, manifest_digest
    from partinfer.runtime.generate import generate
    from partinfer.runtime.loader import load_model
    from partinfer.runtime.sparsity import SparsityConfig

    pack = shutil.copytree(packed_tiny["pack"], tmp_path_factory.mktemp("pk") / "q4")
    manifest = {**packed_tiny["manifest"], **changes}
    if format_change is not None and isinstance(manifest.get("tensor_formats"), dict) and manifest["tensor_formats"]:
        names = sorted(manifest["tensor_formats"])
        manifest["tensor_formats"] = {**manifest["tensor_formats"], names[format_change[0] % len(names)]: format_change[1]}
    if signed:
        manifest["manifest_sha256"] = manifest_digest(manifest)
    (pack / PACK_MANIFEST).write_text(json.dumps(manifest))
    try:
        model = load_model(pack, torch.float32, "cpu", SparsityConfig(method="partinfer", model_neurons=packed_tiny["neurons"]))
    except PartinferError:
        return
    generate(model, [[1, 2, 3]], 2)
