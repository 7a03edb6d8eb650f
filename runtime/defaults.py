"""Defaults that tie the runtime to files shipped with the package (the default model's neuron files)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from runtime.prepare import DEFAULT_MODEL_NAME


def shipped_neuron_files() -> Path:
    """The installed `neuron_files` package: its data files sit beside its __init__.py, in a source tree
    or after a wheel install alike."""
    return Path(str(files("neuron_files")))


def shipped_model_neurons(model: str | None) -> Path | None:
    """The shipped model-level neuron file, when --model is the default model and the file exists."""
    path = shipped_neuron_files() / "model.safetensors"
    if model in (None, "", "default", DEFAULT_MODEL_NAME) and path.is_file():
        return path
    return None
