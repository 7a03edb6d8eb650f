"""The OpenAI HTTP API as partinfer serves it: request bodies (validated) and response objects.

Requests are parsed leniently where OpenAI-compatible servers are lenient — fields we do not know
are ignored, so clients that send extra options keep working — and strictly where a value would
change the answer: an unknown role, `n` > 1, tools, a bad `max_tokens` are 400 errors that say so.
Defaults differ from OpenAI's in one place: `temperature` defaults to 0 (greedy), as in
`partinfer generate`, so an answer is reproducible unless a client asks for sampling.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class BadRequest(Exception):
    """A request we refuse: becomes an OpenAI-style error object with this HTTP status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Union[str, list[dict[str, Any]]]

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest("only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class SamplingFields(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    stream: bool = False
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    n: int = 1
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    logprobs: Optional[bool] = None

    @field_validator("stop")
    @classmethod
    def at_most_four_stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_max_tokens(self) -> int | None:
        value = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if value is not None and value < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {value}", param="max_tokens")
        return value

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise BadRequest(f"n={self.n} is not supported; this server returns one choice (n=1)", param="n")
        if self.tools or self.functions:
            raise BadRequest("tools and function calling are not supported by this server", param="tools")
        if self.logprobs:
            raise BadRequest("logprobs are not supported by this server", param="logprobs")


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                  extension: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens), "partinfer": extension}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None = None, extra: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **(extra or {})}


def text_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                  extension: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens), "partinfer": extension}


def text_chunk(rid: str, model: str, text: str, finish: str | None = None, extra: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], **(extra or {})}
