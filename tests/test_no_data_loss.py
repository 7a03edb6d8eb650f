"""Nothing lost: output paths never delete or overwrite what a command did not write, and interrupted
runs leave nothing behind (common.output_dir, common.atomic)."""

from __future__ import annotations

import errno
import json
import os

import pytest
from typer.testing import CliRunner

from partinfer.cli.app import app
from partinfer.common.output_dir import IncrementalOutput, manifest_name, replace_output_dir
from tests.helpers import make_neuron_file
from tests.test_cli import assert_clean_error

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_neurons(tiny_llama_dir, tmp_path_factory):
    return make_neuron_file(tiny_llama_dir, tmp_path_factory.mktemp("nf") / "model.safetensors")


def user_dir(path, name="notes.txt", text="my thesis"):
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(text)
    return path / name


def pack(model, neurons, out):
    return runner.invoke(app, ["pack", "--model", str(model), "--model-neurons", str(neurons), "--out", str(out)])


def test_pack_into_a_users_directory_keeps_the_file(tiny_llama_dir, tiny_neurons, tmp_path):
    mine = user_dir(tmp_path / "out")
    assert_clean_error(pack(tiny_llama_dir, tiny_neurons, tmp_path / "out"), "did not write", "--out")
    assert mine.read_text() == "my thesis" and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def test_pack_into_the_current_directory_is_refused(tiny_llama_dir, tiny_neurons, tmp_path, monkeypatch):
    mine = user_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert_clean_error(pack(tiny_llama_dir, tiny_neurons, "."), "current directory")
    assert mine.read_text() == "my thesis"


def test_pack_onto_its_own_model_is_refused(tiny_llama_dir, tiny_neurons):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_llama_dir.iterdir()}
    assert_clean_error(pack(tiny_llama_dir, tiny_neurons, tiny_llama_dir), "input")
    assert {p.name: p.stat().st_mtime_ns for p in tiny_llama_dir.iterdir()} == before


def test_pack_out_that_is_a_file_is_refused(tiny_llama_dir, tiny_neurons, tmp_path):
    mine = user_dir(tmp_path, "packed")
    assert_clean_error(pack(tiny_llama_dir, tiny_neurons, mine), "is a file")
    assert mine.read_text() == "my thesis"


def test_pack_replaces_its_own_earlier_output_but_not_a_file_added_to_it(tiny_llama_dir, tiny_neurons, tmp_path):
    out = tmp_path / "packed"
    assert pack(tiny_llama_dir, tiny_neurons, out).exit_code == 0
    first = json.loads((out / manifest_name("pack")).read_text())
    assert pack(tiny_llama_dir, tiny_neurons, out).exit_code == 0  # an earlier pack: replaced
    assert json.loads((out / manifest_name("pack")).read_text())["files"] == first["files"]
    mine = user_dir(out, "README.md")
    assert_clean_error(pack(tiny_llama_dir, tiny_neurons, out), "README.md")
    assert mine.read_text() == "my thesis"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left behind


def test_profile_onto_its_model_keeps_the_checkpoint(tiny_llama_dir, tmp_path):
    data = tmp_path / "prompts.txt"
    data.write_text("one two three\n")
    weights = tiny_llama_dir / "model.safetensors"
    before = weights.read_bytes()
    result = runner.invoke(app, ["profile", "--model", str(tiny_llama_dir), "-d", str(data), "--out", str(tiny_llama_dir)])
    assert_clean_error(result, "input")
    assert weights.read_bytes() == before


def test_profile_into_a_users_directory_keeps_the_file(default_model_dir, tmp_path):
    data = tmp_path / "prompts.txt"
    data.write_text("The cat sat on the mat.\n")
    mine = user_dir(tmp_path / "nf")
    result = runner.invoke(app, ["profile", "-d", str(data), "-n", "1", "--gen-tokens", "1", "--out", str(tmp_path / "nf")])
    assert_clean_error(result, "did not write")
    assert mine.read_text() == "my thesis"


def test_prepare_into_a_users_directory_keeps_the_file(tmp_path):
    mine = user_dir(tmp_path / "model")
    assert_clean_error(runner.invoke(app, ["prepare", "--out", str(tmp_path / "model")]), "did not write")
    assert mine.read_text() == "my thesis"


def test_eval_into_a_users_directory_keeps_the_file(tiny_llama_dir, tmp_path):
    mine = user_dir(tmp_path / "results")
    result = runner.invoke(app, ["eval", "--model", str(tiny_llama_dir), "--methods", "dense", "--tasks", "perplexity",
                                 "--out", str(tmp_path / "results")])
    assert_clean_error(result, "did not write")
    assert mine.read_text() == "my thesis"


def test_eval_malformed_raw_results_are_a_one_line_error(tiny_llama_dir, tmp_path):
    out = IncrementalOutput(tmp_path / "results", "eval")
    out.write_text("raw/dense.json", "{not json")
    result = runner.invoke(app, ["eval", "--model", str(tiny_llama_dir), "--methods", "dense", "--tasks", "perplexity",
                                 "--out", str(tmp_path / "results"), "--table-only"])
    assert_clean_error(result, "raw/dense.json", "not valid JSON")


def test_interrupted_runs_temporaries_are_cleaned_by_the_next_run(tmp_path):
    dead = 2**22 + 12345  # above pid_max's default: no such process
    stale = tmp_path / f".out.partinfer-tmp-{dead}-abc"
    stale.mkdir()
    (stale / "half-written.safetensors").write_bytes(b"\0" * 10)
    live = tmp_path / f".out.partinfer-tmp-{os.getpid()}-xyz"
    live.mkdir()
    with replace_output_dir(tmp_path / "out", "pack") as tmp:
        (tmp / "a.txt").write_text("a")
    assert not stale.exists() and live.exists()  # a live process's temporary is not ours to remove
    assert (tmp_path / "out" / "a.txt").read_text() == "a"


def test_a_failure_inside_the_block_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with replace_output_dir(tmp_path / "out", "pack") as tmp:
            (tmp / "a.txt").write_text("a")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_a_one_line_error_and_leaves_no_file(default_model_dir, tmp_path, monkeypatch):
    import partinfer.common.neuron_file
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(partinfer.common.neuron_file, "save_file", full)
    data = tmp_path / "prompts.txt"
    data.write_text("The cat sat on the mat.\n")
    result = runner.invoke(app, ["profile", "-d", str(data), "-n", "1", "--gen-tokens", "1", "--out", str(tmp_path / "nf")])
    assert_clean_error(result, "No space left on device", "free some disk space")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]


def test_a_full_disk_while_reading_data_is_named_as_a_full_disk(default_model_dir, tmp_path, monkeypatch):
    """datasets writes a cache while it reads a data file and wraps the OSError in its own error: the
    message must say the disk is full, not "check the file and its format"."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    def full_cache(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise DatasetGenerationError("An error occurred while generating the dataset") from e

    monkeypatch.setattr(datasets, "load_dataset", full_cache)
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"text": "The cat sat on the mat."}\n')
    result = runner.invoke(app, ["profile", "-d", str(data), "-n", "1", "--gen-tokens", "1", "--out", str(tmp_path / "nf")])
    assert_clean_error(result, "No space left on device", "free some disk space")
    assert "check" not in result.stderr.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_a_bug_keeps_its_traceback(monkeypatch):
    import partinfer.runtime.prepare
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a genuine bug")

    monkeypatch.setattr(partinfer.runtime.prepare, "prepare_default_model", broken)
    result = runner.invoke(app, ["prepare"])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr and "please report it" in result.stderr


def test_a_killed_writers_temporary_inside_an_output_is_not_foreign(tmp_path):
    """An eval killed while writing a result leaves `.NAME.partinfer-tmp-<pid>-…` in its output: the next
    run accepts the directory and removes that temporary."""
    out = IncrementalOutput(tmp_path / "results", "eval")
    out.write_text("raw/dense.json", "{}")
    stale = tmp_path / "results" / "raw" / f".dense.json.partinfer-tmp-{2**22 + 12345}-abc.tmp"
    stale.write_text("half")
    IncrementalOutput(tmp_path / "results", "eval")
    assert not stale.exists() and (tmp_path / "results" / "raw" / "dense.json").read_text() == "{}"


# ---- single-file outputs (`--plot`): new, or an earlier plot of the same command; never an input ----


def test_plot_onto_the_input_neuron_file_is_refused(tiny_neurons, tmp_path):
    before = tiny_neurons.read_bytes()
    done = runner.invoke(app, ["neurons", "show", str(tiny_neurons), "--plot", str(tiny_neurons)])
    assert_clean_error(done, "input", "--plot")
    assert tiny_neurons.read_bytes() == before


def test_plot_onto_a_users_file_is_refused(tiny_neurons, tmp_path):
    mine = user_dir(tmp_path)
    assert_clean_error(runner.invoke(app, ["neurons", "show", str(tiny_neurons), "--plot", str(mine)]),
                       "not written by", "--plot")
    assert mine.read_text() == "my thesis"


def test_plot_onto_a_users_png_is_refused_but_its_own_plot_is_replaced(tiny_neurons, tmp_path):
    from partinfer.common.output_file import png_text

    theirs = tmp_path / "photo.png"
    theirs.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a PNG that is not ours
    assert_clean_error(runner.invoke(app, ["neurons", "show", str(tiny_neurons), "--plot", str(theirs)]), "not written by")
    assert theirs.read_bytes() == b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    ours = tmp_path / "coverage.png"
    for _ in range(2):  # new, then an earlier plot of the same command
        done = runner.invoke(app, ["neurons", "show", str(tiny_neurons), "--plot", str(ours)])
        assert done.exit_code == 0, done.output
    assert png_text(ours)["partinfer-output"] == "neurons show"
    # another command's plot is not this command's to replace
    assert_clean_error(runner.invoke(app, ["memory", "--plot", str(ours), "--no-peers"]), "not written by")


def test_memory_plot_onto_a_users_file_is_refused_before_measuring(tmp_path):
    mine = user_dir(tmp_path)
    assert_clean_error(runner.invoke(app, ["memory", "--plot", str(mine), "--no-peers"]), "not written by", "--plot")
    assert mine.read_text() == "my thesis"
