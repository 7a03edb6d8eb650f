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


PACK_MANIFEST = "partinfer_pack.json"


def is_packed(model_dir: Path) -> bool:
    return (Path(model_dir) / PACK_MANIFEST).is_file()


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


def read_ffn_neurons(
    reader: CheckpointReader, layer: int, neurons: torch.Tensor, dtype: torch.dtype, device: str,
    expected_perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read only `neurons` (original indices, in this order) of one FFN layer -> gate, up, down_t, each [k, d].

    Packed checkpoint: coalesced contiguous reads of the [n, 3, d] bundle (one read for a hot-first prefix).
    Plain checkpoint: row gathers of gate/up and a column gather of down from the memory map.
    """
    prefix = f"model.layers.{layer}.mlp"
    if f"{prefix}.bundle" in reader:
        perm = reader.get(f"{prefix}.perm").long()  # packed row j holds original neuron perm[j]
        if expected_perm is not None and not torch.equal(perm, expected_perm):
            raise PartinferError(
                f"the packed checkpoint's layer {layer} permutation does not match the model-level neuron file; "
                "pass the neuron file it was packed with, or pack again with `partinfer pack`"
            )
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.shape[0])
        positions = inverse[neurons]  # packed row of each wanted neuron
        order = torch.argsort(positions)
        bundle = reader.slice(f"{prefix}.bundle")
        d = bundle.get_shape()[2]
        out = torch.empty(neurons.shape[0], 3, d, dtype=dtype, device=device)
        filled = 0
        for start, stop in contiguous_runs(positions[order]):
            rows = order[filled : filled + stop - start]
            out[rows.to(device)] = bundle[start:stop].to(device=device, dtype=dtype)
            filled += stop - start
        return out[:, 0].contiguous(), out[:, 1].contiguous(), out[:, 2].contiguous()
    gate = reader.get(f"{prefix}.gate_proj.weight")
    up = reader.get(f"{prefix}.up_proj.weight")
    down = reader.get(f"{prefix}.down_proj.weight")  # [d, n]
    # Advanced indexing already copies into owned memory; .to() is a no-op when dtype and device match.
    return (
        gate[neurons].to(device=device, dtype=dtype),
        up[neurons].to(device=device, dtype=dtype),
        down.t()[neurons].to(device=device, dtype=dtype),
    )


def load_model(
    model_dir: Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", sparsity: "SparsityConfig | None" = None,
) -> Transformer:
    """Build the model on `meta`, swap in SparseFFN for sparse layers, and read only the loaded weights.

    Dense layers (outside --start-num..--end-num) and everything that is not an FFN load whole.
    """
    from runtime.sparse_ffn import SparseFFN
    from runtime.sparsity import SparsityConfig, plan_layers

    sparsity = sparsity or SparsityConfig(method="dense")
    cfg = ModelConfig.from_dir(model_dir)
    plans = plan_layers(sparsity, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
        for i, plan in plans.items():
            model.layers[i].mlp = SparseFFN(cfg, plan, sparsity)
    packed = is_packed(model_dir)
    expected_perms = packed_perms_to_check(model_dir, sparsity, cfg)
    state: dict[str, torch.Tensor] = {}
    with CheckpointReader(model_dir) as reader:
        for i in range(cfg.n_layers):
            if i not in plans and not packed:
                continue  # a dense layer of a plain checkpoint loads by name below
            neurons = plans[i].loaded if i in plans else torch.arange(cfg.ffn_dim)
            gate, up, down_t = read_ffn_neurons(reader, i, neurons, dtype, device, expected_perms.get(i))
            if i in plans:
                state.update({f"layers.{i}.mlp.gate": gate, f"layers.{i}.mlp.up": up,
                              f"layers.{i}.mlp.down": down_t.t().contiguous()})
            else:
                state.update({f"layers.{i}.mlp.gate_proj.weight": gate, f"layers.{i}.mlp.up_proj.weight": up,
                              f"layers.{i}.mlp.down_proj.weight": down_t.t().contiguous()})
            del gate, up, down_t
        for name in model.state_dict():
            if name not in state:
                hf_name = name if name.startswith("lm_head") else f"model.{name}"
                state[name] = owned_copy(reader.get(hf_name), dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers(device)
    for m in model.modules():
        if isinstance(m, SparseFFN):
            m.neuron_ids = m.neuron_ids.to(device)
    return model.eval()


def packed_perms_to_check(model_dir: Path, sparsity: "SparsityConfig", cfg: ModelConfig) -> dict[int, torch.Tensor]:
    """For a packed checkpoint read with a model-level neuron file: the permutation each layer must have."""
    if not is_packed(model_dir) or sparsity.model_neurons is None:
        return {}
    from profiler.neuron_file import NeuronFile

    nf = NeuronFile.load(sparsity.model_neurons, cfg)
    return {i: nf.rank(i).long() for i in range(cfg.n_layers)}


def load_dense_model(model_dir: Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> Transformer:
    """The whole model, every neuron (a packed checkpoint is un-permuted on the fly)."""
    return load_model(model_dir, dtype, device)
