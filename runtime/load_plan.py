"""The load plan: everything a load decides before it reads a weight, read once and passed as one object.

`LoadPlan.build` reads the model's config, each neuron file the configuration names (once; its
rankings as the file stores them) and the pack manifest of the checkpoint it will read (once), and
derives the per-layer plans from them. Packing is one visible step of it: when `weights` asks for a
format the checkpoint does not store, the checkpoint is packed once into the cache (runtime/pack.py,
`cached_pack`) and the plan reads that copy (`from_cached_pack`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from partinfer.common.errors import PartinferError
from partinfer.common.formats.blocks import BlockFormat, weight_scheme
from partinfer.common.formats.pack_format import PackManifest, matrix_name
from partinfer.runtime.config import ModelConfig
from partinfer.runtime.pack import cached_pack
from partinfer.runtime.sparsity import LayerPlan, NeuronFiles, SparsityConfig, plan_layers


@dataclass(frozen=True)
class LoadPlan:
    source: Path  # the checkpoint as given
    checkpoint: Path  # the checkpoint the weights are read from: `source`, or its packed copy
    cfg: ModelConfig
    sparsity: SparsityConfig
    manifest: PackManifest | None  # the checkpoint's pack manifest; None: a plain checkpoint
    neurons: NeuronFiles
    layers: dict[int, LayerPlan]  # the sparse layers' plans

    @classmethod
    def build(cls, model_dir: Path, sparsity: SparsityConfig | None = None, weights: str | None = None) -> "LoadPlan":
        """`weights`: q4, int8 or bf16 (common/formats/blocks.py, WEIGHT_SCHEMES); None: as stored."""
        model_dir = Path(model_dir)
        sparsity = sparsity or SparsityConfig(method="dense")
        cfg = ModelConfig.from_dir(model_dir)
        neurons = NeuronFiles.read(sparsity, cfg)
        manifest = PackManifest.read(model_dir)
        if manifest is not None:
            manifest.check_readable()
            manifest.check_intact()
        stored = "bf16" if manifest is None else manifest.weights
        checkpoint = model_dir
        if weights is not None and weights != stored:
            weight_scheme(weights)  # a one-line error for an unknown name
            if manifest is not None:
                raise PartinferError(f"{model_dir} is packed with {stored} weights; pass --weights {stored}, or pack "
                                     f"the original checkpoint with --weights {weights}")
            if weights != "bf16":
                if neurons.model is None:
                    raise PartinferError(f"--weights {weights} packs the model once and needs --model-neurons FILE "
                                         "(a model-level neuron file) to order it; or pass a checkpoint made by "
                                         "`partinfer pack`")
                manifest = cached_pack(model_dir, sparsity.model_neurons, weights, neurons.model)
                checkpoint = manifest.path
        return cls(model_dir, checkpoint, cfg, sparsity, manifest, neurons, plan_layers(sparsity, cfg, neurons))

    @property
    def from_cached_pack(self) -> bool:
        """Whether the weights come from the packed copy this load asked for (`--weights`)."""
        return self.checkpoint != self.source

    def format_of(self, name: str) -> BlockFormat | None:
        """The block format of the matrix `name` (Hugging Face name), None when it is stored as floats."""
        return None if self.manifest is None else self.manifest.format_of(name)

    def layer_format(self, layer: int, projs: tuple[str, ...]) -> BlockFormat | None:
        """The one format of several matrices that are used fused (q/k/v, gate/up); a one-line error when they differ."""
        formats = {self.format_of(matrix_name(layer, p)) for p in projs}
        if len(formats) != 1:
            raise PartinferError(f"{self.checkpoint}: layer {layer}'s {', '.join(projs)} are stored in different formats; "
                                 "pack the model again")
        return formats.pop()

    def expected_perm(self, layer: int) -> torch.Tensor | None:
        """For a packed checkpoint read with a model-level neuron file: the permutation layer `layer` must have."""
        if self.manifest is None or self.neurons.model is None:
            return None
        return self.neurons.model.rank(layer).long()
