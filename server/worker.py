"""The one model in memory and the queue in front of it.

Requests are admitted up to `max_queue` (running + waiting; beyond that the handler answers 429)
and run one at a time on a single worker thread, so the model, its KV cache and its per-sentence
neuron selection are never shared between two generations. Each request's prompt is a new sentence
(its sparse layers select from its own prefill). When a prompt extends what the KV cache holds —
the next turn of the same conversation — only the new tokens are prefilled, as `partinfer chat` does.

A job reports text pieces and its end through `emit`, from the worker thread; setting `cancelled`
(a client that went away) stops its generation at the next token and frees its place in the queue.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from partinfer.runtime.engine import Engine
from partinfer.runtime.generate import SamplingConfig, generate
from partinfer.runtime.sparse_ffn import sparsity_summary
from partinfer.runtime.text import TextStream
from partinfer.server.protocol import BadRequest


@dataclass(frozen=True)
class ServeConfig:
    model_name: str
    method: str
    context: int = 2048  # KV cache positions: prompt + reply
    max_queue: int = 16  # requests running or waiting; more get 429
    default_max_tokens: int = 256
    retry_after_s: int = 1
    max_body_bytes: int = 4 << 20  # a larger request body is refused (413) before it is read
    allowed_hosts: frozenset[str] = frozenset()  # Host names served besides the loopback ones


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig
    stops: list[str]
    emit: Callable[[str], None] = lambda piece: None  # text pieces as they are decoded (worker thread)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    extension: dict  # the `partinfer` field of a response: method, neurons, speed


class StopStrings:
    """Cuts generated text at the first stop string; holds back a tail that could begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add decoded text; returns what may be sent now."""
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self.flush()
        safe = len(self.text) - self.hold
        out = self.text[self.sent : max(safe, self.sent)]
        self.sent += len(out)
        return out

    def flush(self) -> str:
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out


class ModelWorker:
    def __init__(self, engine: Engine, config: ServeConfig):
        self.engine, self.config = engine, config
        self.context = min(config.context, engine.model.cfg.max_seq_len)
        self.cache = engine.new_cache(1, self.context)
        self.cached_tokens: list[int] = []  # exactly what the KV cache holds
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="partinfer-model")
        self.lock = threading.Lock()
        self.admitted = 0

    def admit(self) -> bool:
        """Take a place in the queue; False when it is full (answer 429)."""
        with self.lock:
            if self.admitted >= self.config.max_queue:
                return False
            self.admitted += 1
            return True

    def release(self) -> None:
        with self.lock:
            self.admitted -= 1

    def job_for(self, prompt_ids: list[int], max_tokens: int | None, sampling: SamplingConfig, stops: list[str]) -> Job:
        """A job, or BadRequest when prompt + reply cannot fit the context."""
        if len(prompt_ids) >= self.context:
            raise BadRequest(f"the prompt has {len(prompt_ids)} tokens; this server's context is {self.context}",
                             param="messages", code="context_length_exceeded")
        room = self.context - len(prompt_ids)
        if max_tokens is None:
            max_tokens = min(self.config.default_max_tokens, room)
        elif max_tokens > room:
            raise BadRequest(f"max_tokens {max_tokens} + the prompt's {len(prompt_ids)} tokens exceed this server's "
                             f"context of {self.context} tokens", param="max_tokens", code="context_length_exceeded")
        return Job(prompt_ids, max_tokens, sampling, stops)

    def submit(self, job: Job) -> Future:
        """Run an admitted job on the model thread; its place is freed when it ends, however it ends."""
        return self.executor.submit(self._run_and_release, job)

    def _run_and_release(self, job: Job) -> Completion:
        try:
            return self._run(job)
        finally:
            self.release()

    @torch.inference_mode()
    def _run(self, job: Job) -> Completion:
        if job.cancelled.is_set():
            return Completion("", "cancelled", len(job.prompt_ids), 0, {})
        engine, ids = self.engine, job.prompt_ids
        extends = self.cached_tokens and ids[: len(self.cached_tokens)] == self.cached_tokens and len(ids) > len(self.cached_tokens)
        if not extends:
            self.cache.reset()
            self.cached_tokens = []
        new = ids[len(self.cached_tokens) :]
        stream, stops = TextStream(engine.tokenizer, engine.stop_ids), StopStrings(job.stops)

        def on_token(tokens: torch.Tensor) -> bool:
            piece = stops.push(stream.push(int(tokens[0])))
            if piece:
                job.emit(piece)
            return stops.stopped or job.cancelled.is_set()

        pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
        try:
            result = generate(engine.model, [new], job.max_tokens, job.sampling, engine.stop_ids, cache=self.cache,
                              on_token=on_token, pad_id=pad)
        except BaseException:
            self.cache.reset()  # whatever the cache holds now is not worth trusting
            self.cached_tokens = []
            raise
        reply = result.tokens[0]
        self.cached_tokens = ids + reply[:-1]  # the last sampled token was never fed back
        rest = stops.flush()
        if rest:
            job.emit(rest)
        if job.cancelled.is_set():
            finish = "cancelled"
        elif stops.stopped or (reply and reply[-1] in engine.stop_ids):
            finish = "stop"
        else:
            finish = "length"
        summary = sparsity_summary(engine.model)
        extension = {"method": self.config.method, "loaded_fraction": summary["loaded_fraction"],
                     "computed_fraction": summary["computed_fraction"],
                     "prefill_tokens_per_s": result.prefill_tps, "decode_tokens_per_s": result.decode_tps}
        return Completion(stops.text, finish, len(ids), len(reply), extension)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
