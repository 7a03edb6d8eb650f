"""CLI behaviour: bad input gives one line on stderr and exit code 2; commands run under CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from partinfer.evaluation.bench import format_bench
from partinfer.cli.app import app

runner = CliRunner()


def assert_clean_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()  # progress bars may come first; the error is one last line
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error:"), result.stderr
    message = errors[0]
    for f in fragments:
        assert f in message


def test_missing_model_path():
    assert_clean_error(runner.invoke(app, ["generate", "-p", "hi", "--model", "/no/such/model"]), "does not exist")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    assert_clean_error(runner.invoke(app, ["generate", "-p", "hi", "--model", str(tmp_path)]), "gpt2", "supported: llama")


def test_empty_prompt(tiny_llama_dir):
    assert_clean_error(runner.invoke(app, ["generate", "-p", "  ", "--model", str(tiny_llama_dir)]), "empty prompt")


def test_generate_json_on_default_model(default_model_dir):
    result = runner.invoke(app, ["generate", "-p", "Name a colour.", "-n", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["text"] and report["new_tokens"] >= 1 and report["decode_tokens_per_s"] > 0


def test_profile_and_neurons_show(default_model_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in ["The cat sat on the mat.", "Rivers flow to the sea."]))
    out = tmp_path / "nf"
    result = runner.invoke(app, ["profile", "-d", str(data), "-n", "2", "--gen-tokens", "2", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tokens"] > 0 and set(report["files"]) == {str(data), "model"}
    from partinfer.common.neuron_file import NeuronFile

    assert NeuronFile.load(out / "model.safetensors").rank_by == "contribution"  # the profile records the down norms
    shown = runner.invoke(app, ["neurons", "show", str(out / "model.safetensors"), str(out / "dataset-prompts.safetensors"),
                                "--plot", str(tmp_path / "cov.png")])
    assert shown.exit_code == 0, shown.output
    assert "overlap of top 70% neurons" in shown.stdout and (tmp_path / "cov.png").stat().st_size > 0


def test_profile_unknown_task(default_model_dir, tmp_path):
    result = runner.invoke(app, ["profile", "-d", "no_such_task_xyz", "--out", str(tmp_path)])
    assert_clean_error(result, "unknown task 'no_such_task_xyz'")
    assert list(tmp_path.iterdir()) == []


def test_pack_and_generate_from_packed(default_model_dir, tmp_path):
    packed = tmp_path / "packed"
    result = runner.invoke(app, ["pack", "--out", str(packed)])
    assert result.exit_code == 0, result.output
    gen = runner.invoke(app, ["generate", "--model", str(packed), "--model-neurons", "neuron_files/model.safetensors",
                              "-p", "Name a colour.", "-n", "6", "--json"])
    assert gen.exit_code == 0, gen.output
    report = json.loads(gen.stdout)
    assert report["text"] and abs(report["sparse_layer_computed_fraction"] - 0.4) < 0.01


def test_generate_rejects_phi_above_gamma():
    assert_clean_error(runner.invoke(app, ["generate", "-p", "hi", "--gamma", "0.3", "--phi", "0.4"]), "--phi 0.4 > --gamma 0.3")


def test_generate_rejects_unknown_token_score():
    assert_clean_error(runner.invoke(app, ["generate", "-p", "hi", "--method", "tokenwise", "--token-score", "up"]),
                       "--token-score must be one of scaled, gate")


def test_predefined_prompts_json(default_model_dir):
    result = runner.invoke(app, ["generate", "--function", "predefined-prompts", "-n", "4", "--json"])
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    assert len(answers) == 5 and all(a["decode_tokens_per_s"] > 0 for a in answers)
    assert all(abs(a["loaded_fraction"] - (6 + 24 * 0.7) / 30) < 0.01 for a in answers)


def test_memory_command(default_model_dir):
    # φ 0.6 above the swept γ 0.5 (as a model's default φ can be): the row holds φ at γ instead of refusing
    result = runner.invoke(app, ["memory", "--gamma", "0.5", "--phi", "0.6", "--methods", "partinfer", "--no-peers", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["rows"]}
    dense, sparse = rows["dense"], rows["partinfer γ=0.5"]
    assert sparse["phi"] == 0.5
    assert sparse["expected_bytes"]["weights"] < dense["expected_bytes"]["weights"]
    assert sparse["model_mib"] < dense["model_mib"]  # a real saving, measured in fresh processes


def memory_transients(prompt_tokens: int) -> dict[str, float]:
    """`partinfer memory --weights q4` (dense and tokenwise γ 0.7) with a prompt of this length: per row,
    the peak during generation over its steady state (model memory + the context's KV cache), MiB."""
    result = runner.invoke(app, ["memory", "--weights", "q4", "--gamma", "0.7", "--methods", "tokenwise", "--no-peers",
                                 "--prompt-tokens", str(prompt_tokens), "--new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["prompt_tokens"] == prompt_tokens and report["kv_cache_mib"] > 0
    return {r["name"]: r["peak_generate_mib"] - r["model_mib"] - report["kv_cache_mib"] for r in report["rows"]}


def test_memory_peak_during_a_long_prompt_is_within_one_tile_of_the_steady_state(default_model_dir):
    """A 256-token prompt on q4 weights: the peak during generation is within one de-quantization tile of
    the steady state (model + KV cache). No whole matrix is ever de-quantized (the tied 49,152 x 576 head
    alone would be 54 MiB in bf16), compact prompts pass through the layers 128 tokens at a time, and the
    sparse layers' statistics are made before the prompt's first transient, not among its activations."""
    from partinfer.runtime.kernels import DEQUANT_TILE_BYTES
    from partinfer.runtime.native import prompt_gemm_available

    tiles = 1 if prompt_gemm_available() else 2  # where prompts de-quantize Q4_1 tiles, the tile is in the peak too
    for name, over in memory_transients(256).items():
        assert over < tiles * DEQUANT_TILE_BYTES / 2**20, (name, over)


def test_memory_peak_does_not_grow_with_the_prompt(default_model_dir):
    """Prompts go through the layers a chunk at a time (128 tokens on compact rows): a 4096-token prompt's
    peak over its steady state (model + KV cache) is a 512-token one's plus its longer attention rows
    (the chunk's [128, 4096] additive mask among them); in one pass, the FFN activations of the 3,584 more
    tokens alone (gate, up, their product: [T, 1536] bf16 each) would add 31 MiB."""
    short, long = memory_transients(512), memory_transients(4096)
    for name, over in short.items():
        assert long[name] < over + 16, (name, over, long[name])


def test_bench_runs_on_tiny_model(tiny_llama_dir):
    result = runner.invoke(app, ["bench", "--model", str(tiny_llama_dir), "--methods", "dense,dense", "--no-peers",
                                 "--new-tokens", "4", "--prompt-len", "8", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    row = report["rows"][0]
    assert len(report["rows"]) == 2 and row["decode_tps"] > 0 and row["floor_tps"] > 0
    # copy tests before each method and at the end; each row's floor from the two around its runs
    copies = report["bandwidth_copies_gbs"]
    assert len(copies) == 3 and report["bandwidth_gbs"] == sorted(copies)[1]
    assert report["gemv_gbs"] is None or report["gemv_gbs"] > 0  # bf16 on CPU: our GEMV's streaming rate
    for i, r in enumerate(report["rows"]):
        assert abs(r["bandwidth_gbs"] - (copies[i] + copies[i + 1]) / 2) < 1e-9
        assert abs(r["floor_tps"] - r["bandwidth_gbs"] * 1e9 / r["bytes_per_token"]) < 1e-6 * r["floor_tps"]
    assert "copy GB/s" in format_bench(report)


def test_hub_id_offline_gives_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_clean_error(runner.invoke(app, ["prepare", "nobody/no-such-model"]), "could not fetch 'nobody/no-such-model'")


def test_the_command_line_turns_off_mkls_buffer_cache_before_torch_loads():
    """`import cli` sets MKL_DISABLE_FAST_MM first (so a prefill's GEMM buffers are given back), unless
    the user set it; the memory workers run with the same setting."""
    import os
    import subprocess
    import sys

    from partinfer.evaluation.memory import WORKER_ENV

    probe = "import cli, os, sys; print(os.environ.get('MKL_DISABLE_FAST_MM'), 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "MKL_DISABLE_FAST_MM"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "False"]
    mine = subprocess.run([sys.executable, "-c", probe], env={**env, "MKL_DISABLE_FAST_MM": "0"}, capture_output=True,
                          text=True, check=True).stdout
    assert mine.split()[0] == "0"
    assert WORKER_ENV["MKL_DISABLE_FAST_MM"] == "1"


def test_a_named_models_defaults_apply_where_no_option_is_given(monkeypatch, tmp_path):
    from dataclasses import replace

    from partinfer.cli.options import sparsity_config
    from partinfer.common.model_registry import NAMED_MODELS

    entry = replace(next(iter(NAMED_MODELS.values())), name="test-model",
                    defaults={"method": "load-only", "gamma": 0.9, "phi": 0.9})
    monkeypatch.setitem(NAMED_MODELS, "test-model", entry)
    unset = {"method": None, "gamma": None, "delta": None, "phi": None, "model_neurons": tmp_path / "n.safetensors"}
    chosen = sparsity_config("test-model", unset)
    assert (chosen.method, chosen.gamma, chosen.phi, chosen.delta) == ("load-only", 0.9, 0.9, 0.3)
    given = sparsity_config("test-model", {**unset, "gamma": 0.8, "phi": 0.5})
    assert (given.method, given.gamma, given.phi) == ("load-only", 0.8, 0.5)  # what the command line says wins
    other = sparsity_config(None, unset)  # the default model has no entry: the dataclass's defaults
    assert (other.method, other.gamma, other.phi) == ("tokenwise", 0.7, 0.4)
    listed = runner.invoke(app, ["models"])
    assert listed.exit_code == 0 and "test-model: Qwen2.5-Coder-1.5B-Instruct" in listed.output
    assert "defaults: method load-only, gamma 0.9, phi 0.9" in listed.output
