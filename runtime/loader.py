"""Reading safetensors checkpoints into a model built on the `meta` device.

Every tensor is copied into memory the process owns and the file handle is dropped afterwards, so
RSS reflects exactly the weights we keep (a tensor left memory-mapped only counts once touched).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from runtime.errors import PartinferError
from runtime.model import ModelConfig, Transformer


def checkpoint_shards(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> shard file, for single-file and sharded (index.json) checkpoints."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = {name: model_dir / file for name, file in weight_map.items()}
        for shard in set(shards.values()):
            if not shard.is_file():
                raise PartinferError(f"checkpoint shard {shard} is missing; re-download or re-convert the model")
        return shards
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise PartinferError(f"no model.safetensors (or index) in {model_dir}; pass a safetensors model directory")
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def our_name(hf_name: str) -> str:
    """transformers' `model.layers.0...` -> our `layers.0...`; `lm_head.weight` stays."""
    return hf_name.removeprefix("model.")


def owned_copy(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A copy in memory we own (not backed by the file mapping), converted to dtype/device."""
    out = torch.empty(t.shape, dtype=dtype, device=device)
    out.copy_(t)
    return out


class CheckpointReader:
    """Opens each shard once; `get(name)` returns the memory-mapped tensor, `slice(name)` a lazy slice."""

    def __init__(self, model_dir: Path):
        self.shards = checkpoint_shards(model_dir)
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()
        self._stack.close()

    def _handle(self, name: str):
        if name not in self.shards:
            raise PartinferError(f"tensor {name} is missing from the checkpoint; the model directory is incomplete")
        shard = self.shards[name]
        if shard not in self._handles:
            self._handles[shard] = self._stack.enter_context(safe_open(shard, "pt"))
        return self._handles[shard]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def slice(self, name: str):
        return self._handle(name).get_slice(name)

    def __contains__(self, name: str) -> bool:
        return name in self.shards


def load_dense_model(model_dir: Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> Transformer:
    """Build the model on `meta` and assign every weight from the checkpoint (no second copy)."""
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    state: dict[str, torch.Tensor] = {}
    with CheckpointReader(model_dir) as reader:
        for name in model.state_dict():
            hf_name = name if name.startswith("lm_head") else f"model.{name}"
            state[name] = owned_copy(reader.get(hf_name), dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers(device)
    return model.eval()
