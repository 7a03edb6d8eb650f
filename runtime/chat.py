"""An interactive conversation that keeps its KV cache across turns and re-selects ε at each user turn.

Each turn renders the whole conversation with the chat template, checks that what the cache already
holds is a prefix of it, and prefills only the new tokens (the new user message and the assistant
header). That prefill is a new "sentence": sparse layers count core neurons over it and choose a
new active set before the reply is decoded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from partinfer.runtime.engine import Engine
from partinfer.common.errors import PartinferError
from partinfer.runtime.generate import GenerationResult, SamplingConfig, generate
from partinfer.runtime.process_memory import proc_status
from partinfer.runtime.sparse_ffn import sparse_modules, sparsity_summary
from partinfer.runtime.text import TextStream, require_utf8

PREDEFINED_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "List three uses of a paperclip.",
    "What is 12 times 12? Explain briefly.",
)


@dataclass
class ChatSession:
    engine: Engine
    context: int = 2048
    max_new_tokens: int = 256
    sampling: SamplingConfig = SamplingConfig()
    history: list[dict] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)  # exactly what the KV cache holds
    last: GenerationResult | None = None
    turns: int = 0

    def __post_init__(self) -> None:
        self.context = min(self.context, self.engine.model.cfg.max_seq_len)
        self.cache = self.engine.new_cache(1, self.context)

    def reset(self) -> None:
        self.history.clear()
        self.cached_tokens.clear()
        self.cache.reset()

    def _conversation_ids(self, user_text: str) -> list[int]:
        return self.engine.encode(user_text, chat_template=True, history=self.history)

    def turn(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer one user message, streaming text; returns the reply."""
        if not user_text.strip():
            raise PartinferError("empty message")
        require_utf8(user_text, "that message")
        full = self._conversation_ids(user_text)
        if full[: len(self.cached_tokens)] != self.cached_tokens:
            self.cache.reset()  # the template re-rendered history differently: start the cache over
            self.cached_tokens = []
        new = full[len(self.cached_tokens) :]
        if len(full) + self.max_new_tokens > self.context:
            raise PartinferError(
                f"the conversation ({len(full)} tokens + {self.max_new_tokens} for the reply) is longer than the "
                f"context of {self.context} tokens; type /reset to start a new conversation or restart with a larger --context"
            )
        stream = TextStream(self.engine.tokenizer, self.engine.stop_ids)

        def on_token(tokens: torch.Tensor) -> None:
            if on_text is not None:
                on_text(stream.push(int(tokens[0])))

        pad = self.engine.tokenizer.pad_token_id or 0
        try:
            result = generate(self.engine.model, [new], self.max_new_tokens, self.sampling, self.engine.stop_ids,
                              cache=self.cache, on_token=on_token, pad_id=pad)
        except KeyboardInterrupt:
            # Ctrl-C: forget this turn. Later writes overwrite its cache slots.
            self.cache.length = len(self.cached_tokens)
            raise
        reply_ids = result.tokens[0]
        # The cache holds the prompt and every reply token but the last sampled one (never fed back).
        self.cached_tokens = full + reply_ids[:-1]
        reply = self.engine.tokenizer.decode(reply_ids, skip_special_tokens=True)
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]
        self.last, self.turns = result, self.turns + 1
        return reply

    def stats(self, method: str, gamma: float, phi: float) -> dict:
        status = proc_status()
        sparse = sparse_modules(self.engine.model)
        return {
            "method": method, "gamma": gamma, "phi": phi, **sparsity_summary(self.engine.model),
            "active_neurons_per_sparse_layer": sparse[0].n_active if sparse else None,
            "turns": self.turns, "context_used": self.cache.length, "context": self.context,
            "last_prefill_tok_s": self.last.prefill_tps if self.last else None,
            "last_decode_tok_s": self.last.decode_tps if self.last else None,
            "rss_mib": status["VmRSS"], "rss_anon_mib": status.get("RssAnon"), "rss_file_mib": status.get("RssFile"),
            "time": time.strftime("%H:%M:%S"),
        }
