"""Reading safetensors checkpoints (single-file or sharded) into memory the process owns.

Every tensor is copied out of the file and the handle is dropped afterwards, so RSS reflects exactly
the weights kept (a tensor left memory-mapped only counts once touched). Row runs of a tensor are
read by positioned reads, so a partial load never touches the rows it skips.
"""

from __future__ import annotations

from pathlib import Path

import torch

from partinfer.common.errors import PartinferError
from partinfer.common.files import read_json
from partinfer.common.safetensors_io import SafetensorsFile


def checkpoint_shards(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> shard file, for single-file and sharded (index.json) checkpoints."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "checkpoint index", "re-download or re-convert the model")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and "/" not in f for f in weight_map.values()):
            raise PartinferError(f"{index} has no valid weight_map of tensor name -> shard file; re-download or re-convert the model")
        shards = {name: model_dir / file for name, file in weight_map.items()}
        for shard in set(shards.values()):
            if not shard.is_file():
                raise PartinferError(f"checkpoint shard {shard} is missing; re-download or re-convert the model")
        return shards
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise PartinferError(f"no model.safetensors (or index) in {model_dir}; pass a safetensors model directory")
    f = SafetensorsFile(single)
    f.close()
    return {name: single for name in f.keys()}


class CheckpointReader:
    """Opens each shard once; reads whole tensors or row runs into owned memory (see safetensors_io)."""

    def __init__(self, model_dir: Path):
        self.shards = checkpoint_shards(model_dir)
        self._files: dict[Path, SafetensorsFile] = {}
        self.bytes_read = 0  # filled in on exit

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        for f in self._files.values():
            f.close()
        self.bytes_read = sum(f.bytes_read for f in self._files.values())
        self._files.clear()

    def file(self, name: str) -> SafetensorsFile:
        if name not in self.shards:
            raise PartinferError(f"tensor {name} is missing from the checkpoint; the model directory is incomplete")
        shard = self.shards[name]
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(shard)
        return self._files[shard]

    def get(self, name: str) -> torch.Tensor:
        return self.file(name).read(name)

    def read_rows(self, name: str, runs: list[tuple[int, int]]) -> torch.Tensor:
        return self.file(name).read_rows(name, runs)

    def __contains__(self, name: str) -> bool:
        return name in self.shards


def contiguous_runs(sorted_positions: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted int positions -> [(start, stop)] half-open runs of consecutive values."""
    pos = sorted_positions.tolist()
    runs: list[tuple[int, int]] = []
    for p in pos:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def read_fused(reader: CheckpointReader, names: list[str], dtype: torch.dtype, device: str) -> torch.Tensor:
    """Tensors concatenated on dim 0, each read straight into its slice of one preallocated tensor.

    Reading parts and then concatenating leaves sub-MiB holes in the heap (more RSS for the same
    weights, docs/design.md §7), so the fused q/k/v and gate/up weights are assembled in place.
    """
    shapes = [reader.file(n).shape(n) for n in names]
    out = torch.empty([sum(s[0] for s in shapes), *shapes[0][1:]], dtype=dtype, device=device)
    row = 0
    for n, shape in zip(names, shapes):
        reader.file(n).read_into(n, out[row : row + shape[0]])
        row += shape[0]
    return out
