"""`partinfer serve`: the model behind an OpenAI-compatible HTTP API and a chat page."""

from __future__ import annotations

import socket
from typing import Annotated, Optional

import typer

from partinfer.cli.options import DtypeOpt, ModelOpt, WeightsOpt, with_sparsity_options
from partinfer.common.errors import PartinferError
from partinfer.runtime.sparsity import SparsityConfig


@with_sparsity_options()
def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default; 0.0.0.0 exposes it to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free one, printed at start).")] = 8000,
    context: Annotated[int, typer.Option("--context", min=16, max=1_048_576, help="KV cache positions per request: prompt + reply.")] = 2048,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, max=10_000, help="Requests running or waiting; beyond it the server answers 429 with Retry-After.")] = 16,
    default_max_tokens: Annotated[int, typer.Option("--default-max-tokens", min=1, max=1_048_576, help="Reply length when a request gives no max_tokens.")] = 256,
    dtype: DtypeOpt = "bf16",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    weights: WeightsOpt = None,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=0.001, max=4096, help="Largest request body; larger ones get 413.")] = 4.0,
    idle_timeout: Annotated[float, typer.Option("--idle-timeout", min=0.1, max=3600, help="Seconds a connection may stay open without sending a request before it is closed.")] = 5.0,
    allowed_host: Annotated[Optional[list[str]], typer.Option("--allowed-host", help="A Host name to serve besides the loopback ones (repeat); the bound --host is allowed too.")] = None,
    *,
    sparsity: SparsityConfig,
) -> None:
    """Serve the model over the OpenAI HTTP API (chat and text completions, streaming, /v1/models) with a
    chat page at /. Each request selects its own neurons from its own prompt."""
    import uvicorn

    from partinfer.runtime.engine import load_engine
    from partinfer.server.app import build_app
    from partinfer.server.guard import IdleClosingH11Protocol
    from partinfer.server.worker import ModelWorker, ServeConfig

    sock = listen(host, port)  # before loading: a taken port fails at once
    port = sock.getsockname()[1]  # the real one for --port 0
    try:
        engine = load_engine(model, dtype, device, sparsity, weights)
    except BaseException:
        sock.close()
        raise
    hosts = frozenset([*(allowed_host or ()), *([host] if host not in ("0.0.0.0", "::") else [])])
    config = ServeConfig(model_name=engine.model_dir.name, method=sparsity.method, context=context,
                         max_queue=max_queue, default_max_tokens=default_max_tokens,
                         max_body_bytes=int(max_body_mb * (1 << 20)), allowed_hosts=hosts)
    worker = ModelWorker(engine, config)
    server = uvicorn.Server(uvicorn.Config(build_app(worker), host=host, port=port, log_level="warning",
                                           http=IdleClosingH11Protocol, timeout_keep_alive=idle_timeout))
    typer.echo(f"partinfer serve: {config.model_name} ({sparsity.method}) on http://{host}:{port} "
               "(OpenAI API under /v1, chat page at /); Ctrl-C stops", err=True)
    try:
        server.run(sockets=[sock])
    finally:
        worker.close()
        sock.close()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; a taken port or a bad address is a one-line error."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as e:
        raise PartinferError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from e
    sock.setblocking(False)
    return sock
