"""Defaults that tie the runtime to files shipped with the package (the default model's neuron files)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from partinfer.common.model_registry import NAMED_MODELS
from partinfer.runtime.prepare import DEFAULT_MODEL_NAME


def shipped_neuron_files() -> Path:
    """The installed `neuron_files` package: its data files sit beside its __init__.py, in a source tree
    or after a wheel install alike."""
    return Path(str(files("partinfer.neuron_files")))


def model_defaults(model: str | None) -> dict:
    """The sparsity defaults a named model's registry entry chooses (by its name, or by its prepared
    directory); {} for any other model."""
    from partinfer.runtime.prepare import named_model_dir

    for named in NAMED_MODELS.values():
        if model == named.name or (model is not None and Path(model).is_dir()
                                   and Path(model).resolve() == named_model_dir(named).resolve()):
            return dict(named.defaults)
    return {}


def shipped_model_neurons(model: str | None) -> Path | None:
    """The model-level neuron file to use when none is given: the shipped one for the default model or a
    named model (`neuron_files/<name>/`), or the one a packed checkpoint was packed with (its rows are
    ordered by it), when the file exists."""
    path = shipped_neuron_files() / "model.safetensors"
    if model in (None, "", "default", DEFAULT_MODEL_NAME) and path.is_file():
        return path
    if model in NAMED_MODELS and (shipped_neuron_files() / model / "model.safetensors").is_file():
        return shipped_neuron_files() / model / "model.safetensors"
    if model is not None and Path(model).is_dir():
        from partinfer.common.output_dir import read_manifest

        packed_with = (read_manifest(Path(model), "pack") or {}).get("model_neurons")
        if isinstance(packed_with, str) and Path(packed_with).is_file():
            return Path(packed_with)
    return None
