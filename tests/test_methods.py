"""The online runtime: every method, selection invariants, batching, re-selection, chat."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from partinfer.cli.app import app
from partinfer.common.errors import PartinferError
from partinfer.runtime.generate import generate
from partinfer.runtime.loader import load_dense_model, load_model
from partinfer.runtime.sparse_ffn import sparse_modules
from partinfer.runtime.sparsity import METHODS, SparsityConfig, fraction_count
from tests.helpers import make_neuron_file, tiny_prompts


@pytest.fixture(scope="module")
def neurons(tiny_llama_dir, tmp_path_factory):
    return make_neuron_file(tiny_llama_dir, tmp_path_factory.mktemp("methods") / "model.safetensors")


def load(model_dir, neurons, **kwargs):
    return load_model(model_dir, torch.float32, "cpu", SparsityConfig(model_neurons=neurons, **kwargs))


@pytest.mark.parametrize("method", METHODS)
def test_phi_gamma_one_gives_dense_tokens(tiny_llama_dir, neurons, method):
    dense = load_dense_model(tiny_llama_dir, dtype=torch.float32)
    model = load(tiny_llama_dir, neurons, method=method, gamma=1.0, phi=1.0, delta=0.3, start_num=0, end_num=3)
    prompts = tiny_prompts(4, seed=3)
    assert generate(model, prompts, 16).tokens == generate(dense, prompts, 16).tokens


def test_tokenwise_gate_score_at_phi_gamma_one_gives_dense_tokens(tiny_llama_dir, neurons):
    dense = load_dense_model(tiny_llama_dir, dtype=torch.float32)
    model = load(tiny_llama_dir, neurons, method="tokenwise", token_score="gate", gamma=1.0, phi=1.0, delta=0.3,
                 start_num=0, end_num=3)
    prompts = tiny_prompts(2, seed=5)
    assert generate(model, prompts, 12).tokens == generate(dense, prompts, 12).tokens


def test_tokenwise_scaled_score_ranks_by_gate_times_sentence_scale(tiny_llama_dir, neurons):
    """After a prefill, a layer's scale is the prompt's mean |up_i| times ‖down_i‖, and decode keeps the
    base plus the highest |act(gate_i)| · scale_i of the rest."""
    from partinfer.runtime.generate import KVCache, prefill

    model = load(tiny_llama_dir, neurons, method="tokenwise", gamma=0.7, delta=0.3, phi=0.4)
    layer = sparse_modules(model)[0]
    captured = []
    layer.register_forward_pre_hook(lambda module, args: captured.append(args[0]))  # the layer's inputs
    prompt = torch.tensor([tiny_prompts(1, seed=9)[0]])
    with torch.inference_mode():
        prefill(model, prompt, KVCache(model.cfg, 1, prompt.shape[1], torch.float32, "cpu"))  # selects
        x = captured[0]  # [1, T, D] the layer's prefill input
        expected = (x @ layer.up.t()).abs().mean(1) * layer.down_t.norm(dim=1)  # [1, k]
        torch.testing.assert_close(layer.score_scale, expected)
        token = torch.randn(1, 1, model.cfg.dim)
        layer(token)
        chosen = layer.last_selected[0, 0]
        score = (layer.act(token[0, 0] @ layer.gate.t()).abs() * expected[0])[layer.n_base :]
    rest = set((chosen[layer.n_base :] - layer.n_base).tolist())
    assert rest == set(torch.topk(score, layer.n_active - layer.n_base).indices.tolist())


@pytest.mark.parametrize("method", ["partinfer", "coreinfer", "static"])
def test_active_set_invariants(tiny_llama_dir, neurons, method):
    model = load(tiny_llama_dir, neurons, method=method, gamma=0.7, delta=0.3, phi=0.4)
    generate(model, tiny_prompts(3, seed=4), 4)
    n = model.cfg.ffn_dim
    layers = sparse_modules(model)
    assert layers
    for m in layers:
        loaded = set(m.neuron_ids.tolist())
        base = set(m.neuron_ids[: m.n_base].tolist())
        for active in m.active_neuron_ids().tolist():
            assert len(active) == len(set(active)) == fraction_count(0.4, n)
            assert base <= set(active) <= loaded
        if method == "partinfer":
            assert len(base) == fraction_count(0.3, n)


def test_batch_equals_one_by_one(tiny_llama_dir, neurons):
    model = load(tiny_llama_dir, neurons, method="partinfer", gamma=0.7, delta=0.3, phi=0.4)
    prompts = tiny_prompts(4, seed=7)
    assert len({len(p) for p in prompts}) > 1  # different lengths: padding is exercised
    batched = generate(model, prompts, 12)
    batched_active = [m.active_neuron_ids().clone() for m in sparse_modules(model)]
    for b, p in enumerate(prompts):
        single = generate(model, [p], 12)
        assert single.tokens[0] == batched.tokens[b]
        for m, act in zip(sparse_modules(model), batched_active):
            assert torch.equal(m.active_neuron_ids()[0].sort().values, act[b].sort().values)


def test_different_prompts_select_different_neurons(tiny_llama_dir, neurons):
    model = load(tiny_llama_dir, neurons, method="partinfer", gamma=0.7, delta=0.3, phi=0.4)
    a, b = tiny_prompts(2, seed=11)
    generate(model, [a], 2)
    first = [m.active_neuron_ids().sort().values for m in sparse_modules(model)]
    generate(model, [b], 2)
    second = [m.active_neuron_ids().sort().values for m in sparse_modules(model)]
    assert any(not torch.equal(x, y) for x, y in zip(first, second))


@pytest.mark.parametrize("kwargs, message", [
    (dict(gamma=0.5, phi=0.6, delta=0.3), "--phi 0.6 > --gamma 0.5"),
    (dict(gamma=0.7, phi=0.4, delta=0.5), "--delta 0.5 > --phi 0.4"),
    (dict(start_num=2, end_num=9), "--end-num 9"),
    (dict(start_num=-1), "--start-num -1"),
])
def test_bad_configuration(tiny_llama_dir, neurons, kwargs, message):
    with pytest.raises(PartinferError, match=message):
        load(tiny_llama_dir, neurons, method="partinfer", **kwargs)


def test_missing_neuron_file(tiny_llama_dir, tmp_path):
    with pytest.raises(PartinferError, match="does not exist"):
        load(tiny_llama_dir, tmp_path / "nope.safetensors", method="partinfer")


def test_chat_reselects_between_turns(default_model_dir):
    from partinfer.runtime.chat import ChatSession
    from partinfer.runtime.engine import load_engine

    engine = load_engine(sparsity=SparsityConfig(method="partinfer", model_neurons=_shipped()))
    session = ChatSession(engine, context=1024, max_new_tokens=16)
    session.turn("What is the capital of France?")
    first = [m.active_neuron_ids().sort().values for m in sparse_modules(engine.model)]
    length_after_first = session.cache.length
    reply = session.turn("Write one sentence about cooking pasta.")
    second = [m.active_neuron_ids().sort().values for m in sparse_modules(engine.model)]
    assert reply and session.cache.length > length_after_first  # the cache was kept and extended
    assert any(not torch.equal(x, y) for x, y in zip(first, second))


def test_chat_cli_two_turns(default_model_dir):
    result = CliRunner().invoke(app, ["chat", "-n", "12", "--context", "512"],
                                input="Hello! Who are you?\nName a fruit.\n/stats\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("tok/s") == 0  # speed goes to stderr
    assert f'"method": "{SparsityConfig().method}"' in result.stdout and '"turns": 2' in result.stdout
    assert result.stderr.count("tok/s]") == 2


def _shipped():
    from partinfer.runtime.defaults import shipped_model_neurons

    path = shipped_model_neurons(None)
    assert path is not None, "neuron_files/model.safetensors is missing"
    return path


def test_prompt_longer_than_context(tiny_llama_dir):
    model = load_dense_model(tiny_llama_dir, dtype=torch.float32)  # max_position_embeddings 256
    with pytest.raises(PartinferError, match="exceed the context"):
        generate(model, [[5] * 300], 4)


def test_chat_longer_than_context_says_how_to_go_on(default_model_dir):
    from partinfer.runtime.chat import ChatSession
    from partinfer.runtime.engine import load_engine

    session = ChatSession(load_engine(sparsity=SparsityConfig(method="dense")), context=64, max_new_tokens=8)
    with pytest.raises(PartinferError, match="/reset"):
        session.turn("Tell me everything about the history of the Roman Empire, " * 4)
    session.reset()
    assert session.turn("Hi!")  # after /reset the conversation goes on


@pytest.mark.parametrize("token_score", ["scaled", "gate"])
def test_tokenwise_computes_phi_per_token_with_base(tiny_llama_dir, neurons, token_score):
    from partinfer.runtime.tokenwise_ffn import TokenwiseFFN

    model = load(tiny_llama_dir, neurons, method="tokenwise", gamma=0.7, delta=0.3, phi=0.4, token_score=token_score)
    layers = sparse_modules(model)
    assert layers and all(isinstance(m, TokenwiseFFN) for m in layers)
    n = model.cfg.ffn_dim
    seen: list[list[set[int]]] = [[] for _ in layers]

    def record(tokens):  # after every decode step: what each layer computed for that token
        for i, m in enumerate(layers):
            if m.last_selected is not None:
                seen[i].append(set(m.active_neuron_ids()[0].tolist()))

    generate(model, tiny_prompts(1, seed=21), 10, on_token=record)
    for m, per_step in zip(layers, seen):
        base = set(m.neuron_ids[: m.n_base].tolist())
        loaded = set(m.neuron_ids.tolist())
        assert len(base) == fraction_count(0.3, n) and len(per_step) >= 8
        for chosen in per_step:
            assert len(chosen) == fraction_count(0.4, n) and base <= chosen <= loaded
        assert len({frozenset(c) for c in per_step}) > 1  # the choice changes from token to token


@pytest.mark.parametrize("token_score", ["scaled", "gate"])
def test_tokenwise_batch_equals_one_by_one(tiny_llama_dir, neurons, token_score):
    model = load(tiny_llama_dir, neurons, method="tokenwise", gamma=0.7, delta=0.3, phi=0.4, token_score=token_score)
    prompts = tiny_prompts(4, seed=8)
    batched = generate(model, prompts, 10)
    for b, p in enumerate(prompts):
        assert generate(model, [p], 10).tokens[0] == batched.tokens[b]


@pytest.mark.parametrize("method", ["dense", "partinfer", "tokenwise"])
def test_a_prompt_in_chunks_equals_the_prompt_at_once(tiny_llama_dir, neurons, method):
    """prefill runs a long prompt in chunks through the layers: the logits of every position, the cache
    and each sequence's chosen neurons are those of one pass, left padding included."""
    from partinfer.runtime.generate import KVCache, left_pad, prefill

    model = load(tiny_llama_dir, neurons, method=method, gamma=0.7, delta=0.3, phi=0.4)
    tokens, mask = left_pad([p * 4 for p in tiny_prompts(2, seed=11)], 0)  # two lengths: the shorter is padded
    results = []
    with torch.inference_mode():
        for chunk in (tokens.shape[1], 7):
            cache = KVCache(model.cfg, 2, tokens.shape[1], torch.float32, "cpu")
            logits = prefill(model, tokens, cache, mask, logits_for="all", chunk_tokens=chunk)
            active = [m.active_neuron_ids().clone() for m in sparse_modules(model)]
            results.append((logits, cache.k[1].clone(), active))
    (one, k_one, active_one), (chunked, k_chunked, active_chunked) = results
    assert tokens.shape[1] > 14 and bool((mask == 0).any())
    real = mask.bool()
    torch.testing.assert_close(chunked[real], one[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k_chunked, k_one, rtol=1e-4, atol=1e-4)
    for a, b in zip(active_chunked, active_one):
        assert torch.equal(a, b)
