"""In front of the API: a Host-header check (DNS rebinding) and a request-body limit, both answered
with OpenAI error objects before the body is parsed (an ASGI layer); and connections that idle are closed
(the HTTP protocol uvicorn runs).

A page on another site can make a browser send requests to 127.0.0.1 under a name it controls (DNS
rebinding); such requests carry that name in `Host`, so only loopback names and the names given with
`--allowed-host` are served. A body larger than the limit is refused with 413 as soon as its
`Content-Length` (or, for a chunked body, the bytes received) passes it, so one request cannot make
the server read, hold and tokenize tens of MiB while every other client waits.

uvicorn closes a kept-alive connection that idles after a response, but not one that never sends a
request, or sends only part of one: hundreds of such sockets would stay open forever and use up the
process's file descriptors. `IdleClosingH11Protocol` applies the same timeout to them.
"""

from __future__ import annotations

import json
from typing import Awaitable, Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

from partinfer.server.protocol import error_body

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def host_name(value: str) -> str:
    """The name part of a Host header: without the port ("[::1]:8000" -> "[::1]")."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class RequestGuard:
    def __init__(self, app: Callable, max_body_bytes: int, allowed_hosts: frozenset[str]):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.allowed_hosts = LOOPBACK_NAMES | {host_name(h) for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if host_name(headers.get("host", "")) not in self.allowed_hosts:
            return await reply(send, 400, error_body(f"Host {headers.get('host', '')!r} is not served; start the "
                                                     "server with --allowed-host NAME to allow it", code="host_not_allowed"))
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await reply(send, 413, self.too_large())
        received = 0
        refused = False

        async def limited() -> dict:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    refused = True
                    return {"type": "http.disconnect"}  # the app stops reading; we answer below
            return message

        async def tracked(message: dict) -> None:
            if not refused:  # what the app answers to a body we cut off is replaced by the 413
                await send(message)

        await self.app(scope, limited, tracked)
        if refused:
            await reply(send, 413, self.too_large())

    def too_large(self) -> dict:
        return error_body(f"the request body is larger than {self.max_body_bytes:,} bytes; send less, or start the "
                          "server with a larger --max-body-mb", code="body_too_large")


async def reply(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class IdleClosingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, whose keep-alive timeout (`timeout_keep_alive`) also closes a connection
    that sends no complete request head: from its start, and after each response, until a request arrives."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_idle_timeout()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is None or self.cycle.response_complete:  # still waiting for a whole request head
            self._arm_idle_timeout()

    def _arm_idle_timeout(self) -> None:
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
