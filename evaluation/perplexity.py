"""Continuation perplexity by method: how much accuracy each way of choosing neurons costs.

Per text: the first `prompt_tokens` tokens are the sentence the runtime selects from (prefill with
every loaded neuron, then selection), and the next `cont_tokens` tokens are scored teacher-forced
with the decode-time neurons, as generation would compute them. This is the measurement of
docs/design.md §1 ("Why |a|") (64-token prompt, 128 scored tokens, held-out news text).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from tqdm import tqdm

from partinfer.evaluation.scoring import score_continuations
from partinfer.runtime.engine import parse_device, parse_dtype
from partinfer.common.errors import PartinferError
from partinfer.runtime.loader import load_model
from partinfer.runtime.model import Transformer
from partinfer.runtime.prepare import resolve_model
from partinfer.runtime.sparsity import SparsityConfig
from partinfer.runtime.text import load_tokenizer


def continuation_logprobs(model: Transformer, prompt: list[int], continuation: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(continuation | prompt) [C] and whether each token is the argmax [C].

    The prompt is a sentence for the runtime (prefill with every loaded neuron, then selection); the
    continuation is computed teacher-forced with the decode-time neurons, as generation would.
    """
    (scored,), _ = score_continuations(model, prompt, [continuation])
    return scored


def continuation_nll(model: Transformer, prompt: list[int], continuation: list[int]) -> float:
    """Sum of -log p(continuation | prompt), the continuation computed with decode-time neurons."""
    return -float(continuation_logprobs(model, prompt, continuation)[0].sum())


def corpus_perplexity(model: Transformer, ids: list[list[int]], prompt_tokens: int, desc: str | None = None) -> float:
    """exp of the mean -log p over every text's continuation (the tokens after its first `prompt_tokens`)."""
    nll = sum(continuation_nll(model, t[:prompt_tokens], t[prompt_tokens:])
              for t in tqdm(ids, desc=desc, unit="text", disable=desc is None))
    return math.exp(nll / sum(len(t) - prompt_tokens for t in ids))


def perplexity_texts(dataset: str, num_samples: int, tokenizer, length: int) -> list[list[int]]:
    """Token ids of the first `num_samples` texts of the data set's eval split with at least `length` tokens."""
    from partinfer.common.data import is_builtin, load_task_records, load_texts

    if is_builtin(dataset):
        records = load_task_records(dataset, "eval")
        texts = [r.get("document") or r.get("story") or r.get("context") or r["prompt"] for r in records]
    else:
        texts = load_texts(dataset)
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == num_samples:
            break
    if not out:
        raise PartinferError(f"no text of {dataset!r} has {length} tokens; lower --prompt-tokens/--cont-tokens")
    return out


def run_perplexity(
    model: str | None, methods: tuple[str, ...], sparsity: SparsityConfig, dataset: str = "xsum",
    num_samples: int = 32, prompt_tokens: int = 64, cont_tokens: int = 128, dtype: str = "bf16", device: str = "cpu",
    weights: str | None = None,
) -> dict:
    model_dir = resolve_model(model)
    ids = perplexity_texts(dataset, num_samples, load_tokenizer(model_dir), prompt_tokens + cont_tokens)
    rows = []
    for method in methods:
        m = load_model(model_dir, parse_dtype(dtype), parse_device(device), replace(sparsity, method=method), weights)
        rows.append({"method": method, "perplexity": corpus_perplexity(m, ids, prompt_tokens, desc=method)})
        del m
    return {"model": str(model_dir), "dataset": dataset, "split": "eval", "texts": len(ids),
            "prompt_tokens": prompt_tokens, "cont_tokens": cont_tokens, "dtype": dtype, "gamma": sparsity.gamma,
            "delta": sparsity.delta, "phi": sparsity.phi, "core_score": sparsity.core_score, "rows": rows}


def format_perplexity(report: dict) -> str:
    lines = [f"continuation perplexity: {report['texts']} texts of {report['dataset']} ({report['split']} split), "
             f"selection on {report['prompt_tokens']} tokens, {report['cont_tokens']} scored; γ {report['gamma']}, "
             f"δ {report['delta']}, φ {report['phi']}, core score {report['core_score']}, {report['dtype']}",
             f"{'method':<12}{'perplexity':>12}{'vs first':>10}"]
    first = report["rows"][0]["perplexity"]
    for r in report["rows"]:
        lines.append(f"{r['method']:<12}{r['perplexity']:>12.2f}{r['perplexity'] / first:>9.2f}x")
    return "\n".join(lines)
