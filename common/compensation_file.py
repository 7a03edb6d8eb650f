"""The compensation file: per sparse layer, a low-rank map from the FFN input to what the unloaded
neurons would have added, fit offline by `partinfer compensate` and added by the runtime.

Tensors per layer i: `layers.{i}.a` float32 [d, r] and `layers.{i}.b` float32 [r, d]; the layer's
correction is (x @ a) @ b. Metadata: format, version, fingerprint (the model's), loaded (a digest of
every sparse layer's loaded neuron set: the map is only right for the set it was fit against), rank,
ridge, tokens, datasets, created. A file made for another model or another loaded set is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from partinfer.common.atomic import atomic_file
from partinfer.common.errors import PartinferError
from partinfer.common.safetensors_io import DIGEST_KEY, check_digest, content_digest, read_whole_file

FORMAT = "partinfer-compensation"
VERSION = 1


@dataclass(frozen=True)
class Compensation:
    a: dict[int, torch.Tensor]  # layer -> [d, r] fp32
    b: dict[int, torch.Tensor]  # layer -> [r, d] fp32
    fingerprint: str
    loaded: str  # digest of the loaded neuron sets it was fit for (runtime.sparsity.loaded_digest)
    rank: int
    ridge: float
    tokens: int
    datasets: tuple[str, ...]
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def save(self, path: Path) -> Path:
        tensors = {}
        for i in sorted(self.a):
            tensors[f"layers.{i}.a"] = self.a[i].float().contiguous()
            tensors[f"layers.{i}.b"] = self.b[i].float().contiguous()
        metadata = {"format": FORMAT, "version": str(VERSION), "fingerprint": self.fingerprint, "loaded": self.loaded,
                    "rank": str(self.rank), "ridge": str(self.ridge), "tokens": str(self.tokens),
                    "datasets": json.dumps(list(self.datasets)), "created": self.created,
                    "layers": json.dumps(sorted(self.a))}
        metadata[DIGEST_KEY] = content_digest(metadata, tensors)  # checked on every load
        with atomic_file(Path(path)) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: Path | str, fingerprint: str | None = None, loaded: str | None = None) -> "Compensation":
        """Read and check a compensation file; with `fingerprint` / `loaded`, also that it fits this model
        and this loaded set (the same γ, δ, neuron files and sparse layers it was fit with)."""
        path = Path(path)
        if not path.is_file():
            raise PartinferError(f"compensation file {path} does not exist; make one with `partinfer compensate`")
        meta, tensors = read_whole_file(path)
        check_digest(path, meta, tensors, "make it again with `partinfer compensate`")
        if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
            raise PartinferError(f"{path} is not a partinfer compensation file (version {VERSION})")
        try:
            layers = [int(i) for i in json.loads(meta["layers"])]
            comp = cls({i: tensors[f"layers.{i}.a"] for i in layers}, {i: tensors[f"layers.{i}.b"] for i in layers},
                       meta["fingerprint"], meta["loaded"], int(meta["rank"]), float(meta["ridge"]),
                       int(meta["tokens"]), tuple(json.loads(meta["datasets"])), meta["created"])
        except (KeyError, ValueError, TypeError) as e:
            raise PartinferError(f"{path} is not a valid compensation file ({e}); make it again") from e
        for i in layers:
            a, b = comp.a[i], comp.b[i]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or a.shape[0] != b.shape[1]:
                raise PartinferError(f"{path}: layer {i} has shapes {list(a.shape)} and {list(b.shape)}; make it again")
            if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
                raise PartinferError(f"{path}: layer {i} holds NaN or infinite values; make it again")
        if fingerprint is not None and comp.fingerprint != fingerprint:
            raise PartinferError(f"{path} was fit for {comp.fingerprint}, not this model ({fingerprint}); "
                                 "fit one for this model with `partinfer compensate`")
        if loaded is not None and comp.loaded != loaded:
            raise PartinferError(f"{path} was fit for another loaded set (other --gamma, --delta, neuron files or "
                                 "sparse layers); fit one for these settings with `partinfer compensate`")
        return comp
