"""The bench: bytes per token, the bandwidth floor, rounds, and a peer that crashes."""

from __future__ import annotations

import pytest
import torch

from partinfer.common.errors import PartinferError
from partinfer.evaluation.bench import floor_tps, weight_bytes_per_token
from partinfer.runtime.generate import generate
from partinfer.runtime.loader import load_dense_model, load_model
from partinfer.runtime.sparsity import SparsityConfig
from tests.helpers import make_neuron_file, tiny_prompts


def test_dense_bytes_per_token(tiny_llama_dir):
    model = load_dense_model(tiny_llama_dir, dtype=torch.bfloat16)
    cfg = model.cfg
    attn = cfg.dim * cfg.head_dim * (cfg.n_heads * 2 + cfg.n_kv_heads * 2)
    ffn = 3 * cfg.dim * cfg.ffn_dim
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    head = cfg.vocab_size * cfg.dim  # untied: the head is read, the input embedding only one row
    assert weight_bytes_per_token(model) == 2 * (cfg.n_layers * (attn + ffn) + norms + head)


def test_sparse_bytes_per_token(tiny_llama_dir, tmp_path):
    neurons = make_neuron_file(tiny_llama_dir, tmp_path / "n.safetensors")
    dense = load_dense_model(tiny_llama_dir, dtype=torch.float32)
    sparse = load_model(tiny_llama_dir, torch.float32, "cpu",
                        SparsityConfig(method="partinfer", model_neurons=neurons, gamma=0.7, delta=0.3, phi=0.4, start_num=1,
                                       end_num=2))
    generate(sparse, tiny_prompts(1), 2)
    cfg = dense.cfg
    m = round(0.4 * cfg.ffn_dim)
    saved = 2 * 3 * cfg.dim * (cfg.ffn_dim - m) * 4  # two sparse layers read m of n neurons
    assert weight_bytes_per_token(dense) - weight_bytes_per_token(sparse) == saved


def test_floor():
    assert floor_tps(30e9, 300_000_000) == 100.0
    assert floor_tps(30e9, 0) == 0.0


def test_continuation_nll_dense_equals_one_forward(tiny_llama_dir):
    from partinfer.evaluation.perplexity import continuation_nll
    from partinfer.runtime.model import KVCache, prefill

    model = load_dense_model(tiny_llama_dir, dtype=torch.float32)
    tokens = tiny_prompts(1, seed=9)[0] + tiny_prompts(1, seed=10)[0]
    split = 5
    with torch.no_grad():
        logits = prefill(model, torch.tensor([tokens]), KVCache(model.cfg, 1, len(tokens), torch.float32, "cpu"),
                         logits_for="all")[0]
    direct = torch.nn.functional.cross_entropy(logits[split - 1 : -1], torch.tensor(tokens[split:]), reduction="sum")
    assert abs(continuation_nll(model, tokens[:split], tokens[split:]) - float(direct)) < 1e-3


def test_continuation_nll_sparse_methods_at_phi_gamma_one(tiny_llama_dir, tmp_path):
    from partinfer.evaluation.perplexity import continuation_nll

    neurons = make_neuron_file(tiny_llama_dir, tmp_path / "n.safetensors")
    tokens = tiny_prompts(1, seed=12)[0] * 2
    dense = continuation_nll(load_dense_model(tiny_llama_dir, dtype=torch.float32), tokens[:6], tokens[6:])
    for method in ("partinfer", "coreinfer", "static", "load-only"):
        model = load_model(tiny_llama_dir, torch.float32, "cpu",
                           SparsityConfig(method=method, gamma=1.0, phi=1.0, model_neurons=neurons))
        assert abs(continuation_nll(model, tokens[:6], tokens[6:]) - dense) < 1e-3
    sparse = load_model(tiny_llama_dir, torch.float32, "cpu",
                        SparsityConfig(method="partinfer", gamma=0.7, phi=0.4, model_neurons=neurons))
    assert continuation_nll(sparse, tokens[:6], tokens[6:]) != dense  # the sparse path really runs


def test_a_peer_that_crashes_is_a_row_and_the_table_is_printed(tiny_llama_dir):
    """The peer runs in its own process: a SIGILL there becomes a one-line row, our rows are measured."""
    from partinfer.evaluation.bench import format_bench, run_bench

    report = run_bench(str(tiny_llama_dir), ("dense",), None, "fp32", "cpu", 8, 4, 1, True, peer_module="tests.crash_peer")
    ours, peer = report["rows"]
    assert ours["name"] == "dense" and ours["decode_tps"] > 0 and ours["note"] is None
    assert peer["name"] == "transformers generate()" and "crashed (SIGILL)" in peer["note"] and peer["decode_tps"] == 0
    table = format_bench(report)
    assert "no result: crashed (SIGILL)" in table and table.splitlines()[3].startswith("dense")


def test_the_peer_child_measures_transformers(tiny_llama_dir):
    from partinfer.evaluation.peers import peer_specs, run_peer

    (name, spec, _), *_ = peer_specs(tiny_llama_dir, "fp32", "cpu", [5, 6, 7, 8], 3, 1)
    outcome = run_peer(spec)
    assert name == "transformers generate()" and outcome.error is None and outcome.decode_tps > 0


def test_rounds_time_every_row_each_round_and_show_the_medians(tiny_llama_dir):
    """--rounds: every row timed once per round (the crashed peer in each too), the median shown."""
    from partinfer.evaluation.bench import format_bench, run_bench

    report = run_bench(str(tiny_llama_dir), ("dense",), None, "fp32", "cpu", 8, 4, 1, True,
                       peer_module="tests.crash_peer", rounds=3)
    ours, peer = report["rows"]
    assert len(ours["decode_rounds"]) == 3 and all(d > 0 for d in ours["decode_rounds"])
    assert sorted(ours["decode_rounds"])[1] == ours["decode_tps"]
    assert peer["decode_rounds"] == [0.0, 0.0, 0.0] and "crashed (SIGILL)" in peer["note"]
    assert len(report["bandwidth_copies_gbs"]) == 3 * 3  # per round: one before each row, one at its end
    assert "decode tok/s by round" in format_bench(report)


def test_ratios_to_llama_cpp_are_taken_within_each_round():
    from partinfer.evaluation.bench import format_rounds

    rows = [{"name": "partinfer", "decode_rounds": [30.0, 20.0, 26.0]},
            {"name": "llama.cpp (model.gguf)", "decode_rounds": [15.0, 16.0, 13.0]}]
    ours, peer = format_rounds(rows)[1:]
    assert ours.split()[-4:] == ["2.00x", "1.25x", "2.00x", "2.00x"]  # 30/15, 20/16, 26/13; median 2.00
    assert peer.split()[-1] == "1.00x"


def test_llama_cpp_bytes_per_token_leave_out_an_untied_embedding(tmp_path):
    import gguf
    import numpy as np

    from partinfer.evaluation.peers import gguf_decode_bytes

    def write(name: str, tensors: dict[str, tuple[int, int]]):
        writer = gguf.GGUFWriter(str(tmp_path / name), "qwen2")
        for tensor, shape in tensors.items():
            writer.add_tensor(tensor, np.ones(shape, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return tmp_path / name

    layer, embd = {"blk.0.ffn_up.weight": (16, 8)}, {"token_embd.weight": (32, 8)}
    untied = write("untied.gguf", {**layer, **embd, "output.weight": (32, 8)})
    tied = write("tied.gguf", {**layer, **embd})
    assert gguf_decode_bytes(untied) == 4 * (16 * 8 + 32 * 8)  # the head, not the embedding
    assert gguf_decode_bytes(tied) == 4 * (16 * 8 + 32 * 8)  # the embedding is the head
    assert gguf_decode_bytes(untied) < untied.stat().st_size
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    with pytest.raises(PartinferError, match="cannot read the GGUF"):
        gguf_decode_bytes(broken)
