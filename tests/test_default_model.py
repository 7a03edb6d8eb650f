"""The embedded default model: our runtime equals transformers on the real weights."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from partinfer.runtime.generate import generate
from partinfer.runtime.loader import load_dense_model
from partinfer.runtime.model import KVCache, prefill
from partinfer.runtime.text import encode_prompt, load_tokenizer


def test_default_model_matches_transformers_greedy(default_model_dir):
    tokenizer = load_tokenizer(default_model_dir)
    prompt = encode_prompt(tokenizer, "Explain in two sentences why the sky is blue.")
    ours = load_dense_model(default_model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        cache = KVCache(ours.cfg, 1, 128, torch.float32, "cpu")
        logits = prefill(ours, ids, cache, logits_for="all")
        assert (logits - ref(ids).logits).abs().max() <= 1e-4
        ref_tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                                  do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    ours_tokens = generate(ours, [prompt], max_new_tokens=32).tokens[0]
    assert ours_tokens == ref_tokens
    assert len(set(ours_tokens)) > 4  # a real answer, not a repeated token
