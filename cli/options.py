"""Options shared by several commands, declared once: the common ones as `Annotated` types, and the
sparsity options generated from `SparsityConfig`'s fields by `with_sparsity_options`."""

from __future__ import annotations

import functools
import inspect
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from partinfer.runtime.sparsity import METHODS, TOKEN_SCORES, SparsityConfig

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Hugging Face model directory or hub id; default: the embedded SmolLM2-135M-Instruct."),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Weight and compute dtype: bf16, fp32 or fp16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON object instead of text.")]
MethodsOpt = Annotated[str, typer.Option("--methods", help=f"Comma-separated methods to compare ({', '.join(METHODS)}).")]
# A load option, not a sparsity one: which weight scheme the rows are read in (packing once if needed).
WeightsOpt = Annotated[
    Optional[str],
    typer.Option("--weights", help="Weight format: q4 (4-bit: Q4_1, with Q8_0 embeddings), int8 (Q8_0) or bf16. A "
                 "checkpoint not packed so is packed once into the cache with the model-level neuron file (default: as "
                 "the checkpoint stores them)."),
]


def split_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


# SparsityConfig field -> (type, flags, help). Defaults come from the dataclass, so they are stated once.
SPARSITY_OPTIONS: dict[str, tuple[Any, tuple[str, ...], str]] = {
    "method": (str, ("--method",), f"{' | '.join(METHODS)} (tokenwise: per-token choice by the gate)."),
    "gamma": (float, ("--loaded-neurons-percent", "--gamma"), "γ: fraction of each sparse FFN layer loaded from disk."),
    "delta": (float, ("--base-neurons-percent", "--delta"), "δ: fraction always computed (base neurons from a neuron file)."),
    "phi": (float, ("--sparsity", "--phi"), "φ: fraction computed per sentence (δ base + ε chosen at prefill)."),
    "token_sparsity": (float, ("--token-sparsity",), "α: fraction of a token's neurons that are its core neurons."),
    "core_score": (str, ("--core-score",), "abs (signed SiLU/GELU activations) or positive (CoreInfer's ReLU rule)."),
    "token_score": (str, ("--token-score",), f"tokenwise ranking: {' or '.join(TOKEN_SCORES)} (scaled: |act(gate)| × "
                    "the sentence's mean |up| × ‖down‖; gate: |act(gate)| alone)."),
    "start_num": (Optional[int], ("--start-num",), "First sparse layer (default scales with depth)."),
    "end_num": (Optional[int], ("--end-num",), "Last sparse layer, inclusive."),
    "base_neurons_type": (str, ("--base-neurons-type",), "model | dataset: which neuron file gives the base neurons."),
    "model_neurons": (Optional[Path], ("--model-neurons",), "Model-level neuron file (default: the shipped one for the default model)."),
    "dataset_neurons": (Optional[Path], ("--dataset-neurons",), "Dataset-level neuron file."),
    "compensation": (Optional[Path], ("--compensation",), "Compensation file for the unloaded neurons (`partinfer "
                     "compensate`, fit for the same γ, δ and neuron files); methods that load every neuron ignore it."),
    "budget": (str, ("--budget",), "uniform (every sparse layer loads γ and computes φ) or profiled (the same total "
               "neurons, spread by layer by the sensitivities in the neuron file: `partinfer neurons sensitivity`)."),
    "refit_tokens": (int, ("--refit-tokens",), "static, coreinfer, partinfer: at the end of each prompt, fit a ridge map from "
                     "its last N tokens' FFN inputs to what the loaded neurons the sentence does not compute add, and add "
                     "it at decode (2·N·d multiply-adds per layer and token); 0: off."),
}
assert set(SPARSITY_OPTIONS) == {f.name for f in fields(SparsityConfig)}, "every SparsityConfig field is an option"
# The fields a named model's registry entry may choose (common/model_registry.py `NamedModel.defaults`).
MODEL_DEFAULT_FIELDS = ("method", "gamma", "delta", "phi")


def sparsity_config(model: str | None, values: dict[str, Any]) -> SparsityConfig:
    """The one place command-line values become a SparsityConfig: an option left out takes the named
    model's default (its registry entry), then the dataclass's; the shipped neuron file is the model's."""
    from partinfer.runtime.defaults import model_defaults, shipped_model_neurons

    chosen = {**model_defaults(model), **{k: v for k, v in values.items() if v is not None or k not in MODEL_DEFAULT_FIELDS}}
    if chosen.get("model_neurons") is None:
        chosen["model_neurons"] = shipped_model_neurons(model)
    return SparsityConfig(**chosen)


def with_sparsity_options(exclude: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Adds the sparsity options (all SparsityConfig fields but `exclude`) to a command and hands it one
    `sparsity: SparsityConfig` argument instead; excluded fields keep their dataclass defaults. The
    fields a named model may set (`MODEL_DEFAULT_FIELDS`) default to None on the command line, so that
    `sparsity_config` can tell an option given from one left to the model's registry entry."""
    defaults = {f.name: f.default for f in fields(SparsityConfig) if f.default is not MISSING}
    names = [name for name in SPARSITY_OPTIONS if name not in exclude]

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)  # real Annotated objects, as typer reads them
        params = [p for p in signature.parameters.values() if p.name != "sparsity"]
        for name in names:
            kind, flags, help_text = SPARSITY_OPTIONS[name]
            default = defaults[name]
            if name in MODEL_DEFAULT_FIELDS:
                kind, default = Optional[kind], None
                help_text += f" Default {defaults[name]}, or a named model's own (`partinfer models`)."
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=Annotated[kind, typer.Option(*flags, help=help_text)]))

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            return command(**kwargs, sparsity=sparsity_config(kwargs.get("model"), values))

        run.__signature__ = signature.replace(parameters=params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate
