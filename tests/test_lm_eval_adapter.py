"""The lm-eval adapter: its scores equal a direct computation; φ = γ = 1 makes every method agree."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from evaluation.lm_eval_adapter import PartinferLM
from runtime.sparsity import METHODS
from tests.helpers import make_neuron_file

PAIRS = [("The capital of France is", " Paris."), ("Two plus two equals", " four"), ("Once upon a time ", "there was")]


@pytest.fixture(scope="module")
def tiny_with_tokenizer(default_model_dir, tmp_path_factory) -> Path:
    """A tiny random Llama with the default model's tokenizer (so text goes in and out)."""
    root = tmp_path_factory.mktemp("lmeval")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(root / "model")
    make_neuron_file(root / "model", root / "neurons.safetensors")
    return root


def requests(kind: str, args_list) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def test_dense_loglikelihood_equals_direct_computation(tiny_with_tokenizer):
    lm = PartinferLM(model=str(tiny_with_tokenizer / "model"), method="dense", dtype="fp32")
    ref = AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer / "model", dtype=torch.float32).eval()
    scores = lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (context, continuation), (score, _greedy) in zip(PAIRS, scores):
        ctx, cont = lm._context_and_continuation(context, continuation)
        with torch.no_grad():
            logprobs = torch.log_softmax(ref(torch.tensor([ctx + cont])).logits[0].float(), -1)
        direct = sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert math.isclose(score, direct, abs_tol=1e-3)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dense"])
def test_methods_agree_at_phi_gamma_one(tiny_with_tokenizer, method):
    common = dict(model=str(tiny_with_tokenizer / "model"), dtype="fp32",
                  model_neurons=str(tiny_with_tokenizer / "neurons.safetensors"))
    dense = PartinferLM(method="dense", **common).loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    other = PartinferLM(method=method, gamma=1.0, phi=1.0, **common).loglikelihood(
        requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(dense, other):
        assert math.isclose(a, b, abs_tol=1e-3) and ga == gb


def test_rolling_and_generate_until(tiny_with_tokenizer):
    lm = PartinferLM(model=str(tiny_with_tokenizer / "model"), method="partinfer", dtype="fp32",
                     model_neurons=str(tiny_with_tokenizer / "neurons.safetensors"))
    (rolling,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [("A short text to score, twice. " * 3,)]),
                                          disable_tqdm=True)
    assert rolling < 0
    (text,) = lm.generate_until(requests("generate_until", [("Hello", {"until": ["\n"], "max_gen_toks": 8})]),
                                disable_tqdm=True)
    assert isinstance(text, str) and "\n" not in text
