"""Our decoder must reproduce transformers' logits and greedy tokens on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from partinfer.runtime.generate import generate
from partinfer.runtime.loader import load_dense_model
from partinfer.runtime.model import KVCache, decode_step, prefill
from tests.tiny_models import TINY_CONFIGS, save_tiny_model


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_logits_match_transformers(kind, tmp_path):
    path = save_tiny_model(kind, tmp_path / kind)
    ours = load_dense_model(path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    cache = KVCache(ours.cfg, 1, 64, torch.float32, "cpu")
    with torch.no_grad():
        logits = prefill(ours, prompt, cache, logits_for="all")
        ref_out = ref(prompt, use_cache=True)
        assert (logits - ref_out.logits).abs().max() <= 1e-4
        past, seq = ref_out.past_key_values, prompt
        token = logits[:, -1].argmax(-1)
        for _ in range(16):
            ours_logits = decode_step(ours, token, cache)
            ref_out = ref(token[:, None], past_key_values=past, use_cache=True)
            past = ref_out.past_key_values
            assert (ours_logits - ref_out.logits[:, -1]).abs().max() <= 1e-4
            token = ours_logits.argmax(-1)
            seq = torch.cat([seq, token[:, None]], dim=1)
    ref_tokens = ref.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours_tokens = generate(ours, [prompt[0].tolist()], max_new_tokens=16).tokens[0]
    assert ours_tokens == ref_tokens[0, prompt.shape[1]:].tolist()
