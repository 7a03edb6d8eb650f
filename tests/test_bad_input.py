"""Every bad input is a one-line error (exit 2) that names the problem and the fix, never a traceback
and never silently wrong output: files, configs, options, text, data and downloads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from partinfer.common.data import load_texts
from partinfer.common.neuron_file import NeuronFile
from partinfer.cli.app import app
from partinfer.common.errors import PartinferError
from partinfer.common.safetensors_io import SafetensorsFile
from tests.helpers import make_neuron_file
from tests.test_cli import assert_clean_error

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_neurons(tiny_llama_dir, tmp_path_factory):
    return make_neuron_file(tiny_llama_dir, tmp_path_factory.mktemp("nf") / "model.safetensors")


# Neuron files -----------------------------------------------------------------------------------

def test_neuron_file_with_nan_statistics_is_refused(tiny_neurons, tmp_path):
    nf = NeuronFile.load(tiny_neurons)
    bad = replace(nf, sum_abs=[t.clone() for t in nf.sum_abs])
    bad.sum_abs[1][3] = float("nan")
    bad.save(tmp_path / "nan.safetensors")
    assert_clean_error(runner.invoke(app, ["neurons", "show", str(tmp_path / "nan.safetensors")]), "NaN")


def test_neuron_file_with_the_wrong_neuron_count_is_refused_by_pack(tiny_llama_dir, tiny_neurons, tmp_path):
    nf = NeuronFile.load(tiny_neurons)
    short = replace(nf, sum_abs=[t[:-1] for t in nf.sum_abs], core_count=[t[:-1] for t in nf.core_count])
    short.save(tmp_path / "short.safetensors")  # the right fingerprint, one neuron too few per layer
    result = runner.invoke(app, ["pack", "--model", str(tiny_llama_dir), "--model-neurons",
                                 str(tmp_path / "short.safetensors"), "--out", str(tmp_path / "packed")])
    assert_clean_error(result, "expected float [96]")
    assert not (tmp_path / "packed").exists()


# Safetensors headers and model configs ---------------------------------------------------------

def write_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("offsets", [[-8, 0], [0, 64], [4, 2]])
def test_safetensors_header_offsets_outside_the_data_are_refused(tmp_path, offsets):
    path = write_safetensors(tmp_path / "w.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": offsets}},
                             b"\0" * 8)
    with pytest.raises(PartinferError, match="data offsets"):
        SafetensorsFile(path)


def test_safetensors_shape_that_does_not_match_its_bytes_is_refused(tmp_path):
    path = write_safetensors(tmp_path / "w.safetensors", {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                             b"\0" * 8)
    with pytest.raises(PartinferError, match="does not match"):
        SafetensorsFile(path)


def model_copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_weights_that_do_not_match_the_config_are_refused(tiny_llama_dir, tmp_path):
    model = model_copy(tiny_llama_dir, tmp_path / "m", intermediate_size=64)
    assert_clean_error(runner.invoke(app, ["generate", "-p", "hi", "--model", str(model), "--method", "dense"]),
                       "layers.0.mlp.gate_proj.weight has shape [96, 64]", "do not match")


def test_malformed_config_json(tiny_llama_dir, tmp_path):
    model = model_copy(tiny_llama_dir, tmp_path / "m")
    (model / "config.json").write_text('{"model_type": "llama",')
    assert_clean_error(runner.invoke(app, ["generate", "-p", "hi", "--model", str(model)]), "not valid JSON")


@pytest.mark.parametrize("change, fragment", [
    ({"hidden_size": None}, "lacks the key 'hidden_size'"),
    ({"num_hidden_layers": "four"}, "n_layers must be a positive integer"),
    ({"num_attention_heads": 0}, "n_heads must be a positive integer"),
    ({"rms_norm_eps": float("nan")}, "norm_eps must be a positive finite number"),
    ({"rope_parameters": "big"}, "wrong type"),
])
def test_config_keys_and_types(tiny_llama_dir, tmp_path, change, fragment):
    model = model_copy(tiny_llama_dir, tmp_path / "m", **change)
    assert_clean_error(runner.invoke(app, ["generate", "-p", "hi", "--model", str(model), "--method", "dense"]), fragment)


# Options and text ------------------------------------------------------------------------------

@pytest.mark.parametrize("options, fragment", [
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["--gamma", "nan"], "--gamma"),
    (["--phi", "1e999"], "--phi"),
    (["--max-new-tokens", "99999999999999999999"], "--max-new-tokens"),
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--max-new-tokens", "1e3"], "should be a valid integer"),
])
def test_bad_numeric_options(tiny_llama_dir, options, fragment):
    assert_clean_error(runner.invoke(app, ["generate", "-p", "hi", "--model", str(tiny_llama_dir), *options]), fragment)


def test_prompt_that_is_not_utf8(tiny_llama_dir):
    # argv bytes that are not UTF-8 reach Python as lone surrogates (PEP 383)
    assert_clean_error(runner.invoke(app, ["generate", "-p", "caf\udce9", "--model", str(tiny_llama_dir)]),
                       "--prompt is not valid UTF-8")


def test_chat_survives_a_line_that_is_not_utf8(default_model_dir):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8"}
    done = subprocess.run([sys.executable, "-m", "partinfer.cli", "chat", "-n", "4"], input=b"caf\xe9\nHello\n/exit\n",
                          capture_output=True, env=env, timeout=300)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "not valid UTF-8" in err and "Traceback" not in err
    assert "tok/s]" in err  # the next line was answered


@pytest.mark.parametrize("name, content, fragment", [
    ("latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), "UTF-8"),
    ("broken.jsonl", b'{"text": "a"}\n{"text": \n', "JSON lines"),
    ("empty.jsonl", b"", "is empty"),
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b"\n  \n", "no non-empty texts"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1"), "UTF-8"),
])
def test_bad_data_files(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PartinferError, match=fragment):
        load_texts(str(path))


def test_bad_data_file_on_the_command_line(tiny_llama_dir, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b'{"text": \n')
    result = runner.invoke(app, ["profile", "--model", str(tiny_llama_dir), "-d", str(path), "--out", str(tmp_path / "nf")])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_builtin_task_file_that_is_corrupt_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PARTINFER_HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "squad.jsonl").write_text('{"prompt": "a"}\n{"prompt": ')
    with pytest.raises(PartinferError, match="data fetch --force squad"):
        load_texts("squad")


# Downloads and the kernel build ----------------------------------------------------------------

def test_truncated_cached_download_is_replaced_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("PARTINFER_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no registry in this test: the re-download fails fast
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    archive = tmp_path / "downloads" / "bigbench-1.0.0.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(b"\x1f\x8b\x08" + b"\0" * 100)  # the start of a gzip file, cut short
    result = runner.invoke(app, ["data", "fetch", "squad"])
    assert_clean_error(result, "could not download bigbench==1.0.0")
    assert "incomplete or corrupt" in result.stderr
    assert not archive.exists()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_a_killed_first_kernel_build_neither_hangs_nor_leaves_compilers(tmp_path, tiny_with_tokenizer):
    """SIGKILL during the first build, then `partinfer generate`: it builds again and answers, well
    within its timeout, and the killed build's compilers are gone."""
    env = {**os.environ, "PARTINFER_HOME": str(tmp_path)}
    first = subprocess.Popen([sys.executable, "-m", "partinfer.runtime.native"], env=env, stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not compilers_in(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert compilers_in(tmp_path), "the build never started a compiler"
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(2)
    assert compilers_in(tmp_path) == [], "compilers outlived the killed build"
    # torch's own lock file is left behind by the killed build: the next run must not wait on it
    started = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "partinfer.cli", "generate", "-p", "Hi", "-n", "2", "--method", "dense",
                             "--model", str(tiny_with_tokenizer / "model"), "--dtype", "bf16", "--json"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "unavailable" not in second.stderr and next((tmp_path / "build").glob("*/partinfer_cpu.ready"))
    assert time.monotonic() - started < 120, "the rebuild took longer than it should"


def compilers_in(home: Path) -> list[int]:
    """Processes whose working directory is under `home` (ninja and the compilers run in the build directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(home)):
            found.append(int(proc.name))
    return found
