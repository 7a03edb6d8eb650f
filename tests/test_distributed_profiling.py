"""Profiling beyond one process: torchrun data parallelism (gloo, loopback) and exact merges of neuron
files made apart (profiler/distributed.py, `partinfer neurons merge`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from partinfer.cli.app import app
from partinfer.common.neuron_file import NeuronFile
from partinfer.profiler.distributed import Ranks, shard_by_tokens
from tests.test_cli import assert_clean_error

runner = CliRunner()
TEXTS = ["The cat sat on the mat.", "Rivers flow to the sea and the sea to the clouds.", "Hello.",
         "A long sentence about neurons, layers, weights and the memory they need on a small device.",
         "Bread, butter and jam.", "Why is the sky blue?", "Seven.", "Compilers turn code into machine code."]


def test_shards_are_disjoint_complete_and_balanced():
    lengths = [30, 5, 17, 17, 2, 40, 8, 8, 11]
    shards = [shard_by_tokens(lengths, Ranks(r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(len(lengths)))
    totals = [sum(lengths[i] for i in s) for s in shards]
    assert max(totals) - min(totals) <= max(lengths)
    assert shards == [shard_by_tokens(lengths, Ranks(r, 3)) for r in range(3)]  # deterministic


def profile_command(model: Path, data: Path, out: Path) -> list[str]:
    return ["-m", "partinfer.cli", "profile", "--model", str(model), "-d", str(data), "-n", str(len(TEXTS)), "--gen-tokens", "2",
            "--batch-size", "1", "--out", str(out), "--json"]


def one_thread_env() -> dict:
    # One thread per process in both runs, so each prompt's arithmetic is the same whatever the run.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_two_gloo_processes_write_what_one_process_writes(tiny_with_tokenizer, tmp_path):
    model = tiny_with_tokenizer / "model"
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    single = subprocess.run([sys.executable, *profile_command(model, data, tmp_path / "one")], env=one_thread_env(),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    double = subprocess.run([*torchrun, *profile_command(model, data, tmp_path / "two")], env=one_thread_env(),
                            capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr
    assert json.loads(double.stdout)["tokens"] == json.loads(single.stdout)["tokens"]  # rank 0 alone reports
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    for name in ("model.safetensors", "dataset-prompts.safetensors"):
        one, two = NeuronFile.load(tmp_path / "one" / name), NeuronFile.load(tmp_path / "two" / name)
        assert (two.tokens, two.sequences, two.datasets) == (one.tokens, one.sequences, one.datasets)
        for i in range(one.n_layers):
            assert torch.equal(two.core_count[i], one.core_count[i])
            torch.testing.assert_close(two.sum_abs[i], one.sum_abs[i], rtol=1e-6, atol=0)


def test_merging_two_halves_equals_profiling_the_whole(tiny_with_tokenizer, tmp_path):
    from partinfer.profiler.profile import ProfileConfig, profile_texts, to_neuron_file
    from partinfer.runtime.engine import load_engine

    engine = load_engine(str(tiny_with_tokenizer / "model"), "fp32")
    cfg = ProfileConfig(num_samples=len(TEXTS), gen_tokens=2, batch_size=1)

    def profile(texts: list[str], path: Path) -> NeuronFile:
        nf = to_neuron_file(profile_texts(engine, texts, cfg), engine.model, "tiny", "prompts", len(texts), cfg)
        nf.save(path)
        return nf

    whole = profile(TEXTS, tmp_path / "whole.safetensors")
    profile(TEXTS[:3], tmp_path / "a.safetensors")
    profile(TEXTS[3:], tmp_path / "b.safetensors")
    result = runner.invoke(app, ["neurons", "merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                                 "-o", str(tmp_path / "merged.safetensors")])
    assert result.exit_code == 0, result.output
    merged = NeuronFile.load(tmp_path / "merged.safetensors")
    assert (merged.tokens, merged.sequences, merged.datasets, merged.level) == (whole.tokens, 8, ("prompts",), "dataset")
    for i in range(whole.n_layers):
        assert torch.equal(merged.core_count[i], whole.core_count[i])
        torch.testing.assert_close(merged.sum_abs[i], whole.sum_abs[i], rtol=1e-6, atol=0)
        assert torch.equal(merged.rank(i), whole.rank(i)) or torch.allclose(merged.mean_abs(i), whole.mean_abs(i))


@pytest.mark.parametrize("change, fragment", [
    ({"fingerprint": "llama-L4-d64-n96-v128"}, "fingerprint"),
    ({"token_sparsity": 0.3}, "--token-sparsity"),
    ({"core_score": "positive"}, "--core-score"),
    ({"gen_tokens": 32}, "--gen-tokens"),
])
def test_files_profiled_differently_refuse_to_merge(tiny_with_tokenizer, tmp_path, change, fragment):
    nf = NeuronFile.load(tiny_with_tokenizer / "neurons.safetensors")
    other = replace(nf, **change).save(tmp_path / "other.safetensors")
    result = runner.invoke(app, ["neurons", "merge", str(tiny_with_tokenizer / "neurons.safetensors"), str(other),
                                 "-o", str(tmp_path / "merged.safetensors")])
    assert_clean_error(result, "cannot merge", fragment)
    assert not (tmp_path / "merged.safetensors").exists()


def test_merge_never_replaces_a_file_that_is_not_a_neuron_file(tiny_with_tokenizer, tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("my thesis")
    nf = str(tiny_with_tokenizer / "neurons.safetensors")
    assert_clean_error(runner.invoke(app, ["neurons", "merge", nf, nf, "-o", str(mine)]), "exists")
    assert_clean_error(runner.invoke(app, ["neurons", "merge", nf, nf, "-o", str(mine), "--force"]), "notes.txt")
    assert mine.read_text() == "my thesis"


def test_merge_refuses_the_same_file_twice_by_content(tiny_with_tokenizer, tmp_path):
    """`neurons merge A A' B` (A' a copy of A) would count A's tokens twice: refused, nothing written."""
    import shutil

    a = tiny_with_tokenizer / "neurons.safetensors"
    copy = shutil.copy(a, tmp_path / "copy.safetensors")
    other = replace(NeuronFile.load(a), tokens=NeuronFile.load(a).tokens + 1).save(tmp_path / "b.safetensors")
    result = runner.invoke(app, ["neurons", "merge", str(a), str(copy), str(other), "-o", str(tmp_path / "m.safetensors")])
    assert_clean_error(result, "same statistics", "give each file once")
    assert not (tmp_path / "m.safetensors").exists()


def _rank_that_fails(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    from partinfer.common.errors import PartinferError
    from partinfer.profiler.distributed import Ranks, together

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        def work() -> int:
            if rank == 1:
                raise PartinferError("data file shard.jsonl line 3 is not valid JSON; fix the file")
            return 7

        try:
            together(Ranks(rank, world), work)
            results[rank] = "no error"
        except PartinferError as e:
            results[rank] = str(e)
        results[f"{rank} ok"] = together(Ranks(rank, world), lambda: rank)  # the group is still usable
    finally:
        dist.destroy_process_group()


def test_a_failed_rank_stops_every_rank_with_its_one_line_error():
    """Two gloo processes, rank 1's work fails with our error: rank 1 raises it, rank 0 raises one line
    naming rank 1 and that error (not gloo's "Connection closed by peer" from a collective it waits in)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_that_fails, args=(2, port, results), nprocs=2, join=True)
        results = dict(results)
    assert results[1] == "data file shard.jsonl line 3 is not valid JSON; fix the file"
    assert results[0] == "rank 1 of 2 failed, so this rank stops too: data file shard.jsonl line 3 is not valid JSON; fix the file"
    assert results["0 ok"] == 0 and results["1 ok"] == 1
