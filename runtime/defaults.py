"""Defaults that tie the runtime to files shipped in this repository (the default model's neuron files)."""

from __future__ import annotations

from pathlib import Path

from runtime.prepare import DEFAULT_MODEL_NAME

SHIPPED_NEURON_FILES = Path(__file__).resolve().parent.parent / "neuron_files"


def shipped_model_neurons(model: str | None) -> Path | None:
    """The shipped model-level neuron file, when --model is the default model and the file exists."""
    path = SHIPPED_NEURON_FILES / "model.safetensors"
    if model in (None, "", "default", DEFAULT_MODEL_NAME) and path.is_file():
        return path
    return None
