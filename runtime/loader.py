"""Reading safetensors checkpoints into a model built on the `meta` device.

Every tensor is copied into memory the process owns and the file handle is dropped afterwards, so
RSS reflects exactly the weights we keep (a tensor left memory-mapped only counts once touched).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from partinfer.common.errors import PartinferError
from partinfer.common.files import read_json
from partinfer.runtime.model import CompactEmbedding, ModelConfig, Transformer
from partinfer.runtime.quant import WEIGHT_FORMATS, WeightFormat
from partinfer.runtime.decode import choose_backend
from partinfer.runtime.native import cpu_kernels
from partinfer.common.output_dir import manifest_name
from partinfer.common.safetensors_io import SafetensorsFile

if TYPE_CHECKING:
    from partinfer.runtime.sparsity import SparsityConfig


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


PACK_MANIFEST = manifest_name("pack")  # written by `partinfer pack` (common.output_dir)


def is_packed(model_dir: Path) -> bool:
    return (Path(model_dir) / PACK_MANIFEST).is_file()


PACK_VERSION = 2  # what `partinfer pack` writes; compact packs before 2 held down as Q8_0 rows per neuron


def stale_compact_pack(model_dir: Path) -> bool:
    """A compact packed checkpoint in a layout this version no longer reads (bf16 packs never change)."""
    from partinfer.common.output_dir import read_manifest

    return _stale(read_manifest(model_dir, "pack") or {})


def _stale(manifest: dict) -> bool:
    version = manifest.get("version", 1)
    return manifest.get("weights", "bf16") != "bf16" and (not isinstance(version, int) or version < PACK_VERSION)


def packed_weight_format(model_dir: Path) -> WeightFormat:
    """The weight format a packed checkpoint was written in (bf16 for any other checkpoint)."""
    from partinfer.common.output_dir import read_manifest

    manifest = read_manifest(model_dir, "pack") or {}
    name = manifest.get("weights", "bf16")
    if name not in WEIGHT_FORMATS:
        raise PartinferError(f"{model_dir} was packed with weights {name!r}, which this version cannot read; pack it again")
    if _stale(manifest):
        raise PartinferError(f"{model_dir} holds {name} weights in an older layout (down rows per neuron); "
                             "pack it again with `partinfer pack`")
    return WEIGHT_FORMATS[name]


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
    expected_perm: torch.Tensor | None = None, fmt: WeightFormat = WEIGHT_FORMATS["bf16"], dim: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read only `neurons` (original indices, in this order) of one FFN layer -> gate, up, down_t, each
    [k, d] in `dtype`, or uint8 compact rows (gate, up) and down codes for a compact pack (`fmt`, model
    width `dim`; the layer's down table is read apart).

    Packed checkpoint: coalesced contiguous reads of the [n, 3, d] (or [n, bytes]) bundle: one read
    for a hot-first prefix. Plain checkpoint: coalesced row runs of gate/up; down is read whole for
    its column gather (one layer).
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
        rows = reader.read_rows(f"{prefix}.bundle", contiguous_runs(positions[order]))  # [k, 3, d] ascending
        rows = rows if torch.equal(order, torch.arange(len(order))) else rows[torch.argsort(order)]
        if fmt.compact:  # [k, bytes]: gate | up blocks | down codes; views, copied once by the caller into their final layout
            g = fmt.gate_up.row_bytes(dim)
            rows = rows.to(device=device)
            return rows[:, :g], rows[:, g : 2 * g], rows[:, 2 * g :]
        rows = rows.to(device=device, dtype=dtype)
        return rows[:, 0].contiguous(), rows[:, 1].contiguous(), rows[:, 2].contiguous()
    order = torch.argsort(neurons)  # read in ascending row order, put back in `neurons` order
    runs = contiguous_runs(neurons[order])
    back = torch.argsort(order)
    gate = reader.read_rows(f"{prefix}.gate_proj.weight", runs)[back]
    up = reader.read_rows(f"{prefix}.up_proj.weight", runs)[back]
    down_t = reader.get(f"{prefix}.down_proj.weight").t()[neurons]  # a column gather needs the whole [d, n]
    return gate.to(device=device, dtype=dtype), up.to(device=device, dtype=dtype), down_t.to(device=device, dtype=dtype)


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


def hf_names(name: str) -> list[str]:
    """transformers tensor names that make up one of our parameters (fused ones are concatenated on dim 0)."""
    if name.startswith("lm_head"):
        return [name]
    hf = f"model.{name}"
    if ".self_attn.qkv_proj." in hf:
        return [hf.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
    if hf.endswith(".mlp.gate_up"):
        return [hf.replace("gate_up", "gate_proj.weight"), hf.replace("gate_up", "up_proj.weight")]
    if hf.endswith(".mlp.down"):
        return [hf.replace("down", "down_proj.weight")]
    return [hf]


def load_model(
    model_dir: Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", sparsity: "SparsityConfig | None" = None,
) -> Transformer:
    """Build the model on `meta`, swap in SparseFFN for sparse layers, and read only the loaded weights.

    Dense layers (outside --start-num..--end-num) and everything that is not an FFN load whole.
    """
    from partinfer.runtime.sparse_ffn import CompactSparseFFN, is_sparse
    from partinfer.runtime.sparsity import SparsityConfig, plan_layers

    sparsity = sparsity or SparsityConfig(method="dense")
    if dtype == torch.bfloat16 and str(device).startswith("cpu"):
        cpu_kernels()  # build or load the compiled decode kernels now, not inside a timed step
    model_dir = weights_source(Path(model_dir), sparsity)
    cfg = ModelConfig.from_dir(model_dir)
    plans = plan_layers(sparsity, cfg)
    fmt = packed_weight_format(model_dir)
    model = build_model(cfg, plans, sparsity, fmt, dtype)
    packed = is_packed(model_dir)
    expected_perms = packed_perms_to_check(model_dir, sparsity, cfg)
    state: dict[str, torch.Tensor] = {}
    with CheckpointReader(model_dir) as reader:
        for i in range(cfg.n_layers):
            if i not in plans and not packed:
                continue  # a dense layer of a plain checkpoint loads by name below
            neurons = plans[i].loaded if i in plans else torch.arange(cfg.ffn_dim)
            gate, up, down_t = read_ffn_neurons(reader, i, neurons, dtype, device, expected_perms.get(i), fmt, cfg.dim)
            if fmt.compact:
                state[f"layers.{i}.mlp.down_table"] = reader.get(f"model.layers.{i}.mlp.down_table")
            if i in plans and sparsity.method == "tokenwise":
                own = dict(memory_format=torch.contiguous_format)  # compact rows arrive as views of one read
                state.update({f"layers.{i}.mlp.gate": gate.clone(**own), f"layers.{i}.mlp.up": up.clone(**own),
                              f"layers.{i}.mlp.down_t": down_t.clone(**own)})
            elif fmt.compact:  # CompactSparseFFN, sparse or dense: each final tensor made once, no transients
                state.update({f"layers.{i}.mlp.gate_up": torch.stack([gate, up], dim=1),  # [k, 2, bytes]
                              f"layers.{i}.mlp.down_t": down_t.clone(memory_format=torch.contiguous_format)})
            elif i in plans:
                h = plans[i].n_active
                # clone, not contiguous(): an empty or already-contiguous view would keep down_t's storage alive
                own = dict(memory_format=torch.contiguous_format)
                state.update({f"layers.{i}.mlp.gate_up": torch.stack([gate, up], dim=1),  # [k, 2, d]
                              f"layers.{i}.mlp.down_head": down_t[:h].t().clone(**own),  # [d, h]
                              f"layers.{i}.mlp.down_tail": down_t[h:].t().clone(**own)})
            else:
                state.update({f"layers.{i}.mlp.gate_up": torch.cat([gate, up]),
                              f"layers.{i}.mlp.down": down_t.t().contiguous()})
            del gate, up, down_t
        for name, meta in model.state_dict().items():
            if name not in state:  # compact matrices keep their uint8 rows; the rest is cast to `dtype`
                state[name] = read_fused(reader, hf_names(name), torch.uint8 if meta.dtype == torch.uint8 else dtype, device)
    check_shapes(model, state, model_dir)
    model.load_state_dict(state, strict=True, assign=True)
    attach_compensation(model, plans, sparsity)
    model.init_buffers(device)
    model.checkpoint_bytes_read = reader.bytes_read
    model.backend = choose_backend(model)
    for m in model.modules():
        if is_sparse(m) or isinstance(m, CompactSparseFFN):  # a compact dense layer reads its blocks from them
            m.neuron_ids = m.neuron_ids.to(device)
    return model.eval()


def weights_source(model_dir: Path, sparsity: "SparsityConfig") -> Path:
    """The checkpoint that holds `sparsity.weights`: `model_dir` itself when it stores that format (or no
    format is asked for), else its packed copy in the cache (made once, runtime.pack.cached_pack)."""
    from partinfer.runtime.pack import cached_pack

    stored = packed_weight_format(model_dir).name
    if sparsity.weights in (None, stored):
        return model_dir
    if is_packed(model_dir):
        raise PartinferError(f"{model_dir} is packed with {stored} weights; pass --weights {stored}, or pack the original "
                             f"checkpoint with --weights {sparsity.weights}")
    if sparsity.weights == "bf16":
        return model_dir
    if sparsity.model_neurons is None:
        raise PartinferError(f"--weights {sparsity.weights} packs the model once and needs --model-neurons FILE "
                             "(a model-level neuron file) to order it; or pass a checkpoint made by `partinfer pack`")
    return cached_pack(model_dir, sparsity.model_neurons, sparsity.weights)


def build_model(cfg: ModelConfig, plans: dict, sparsity: "SparsityConfig", fmt: WeightFormat,
                dtype: torch.dtype) -> Transformer:
    """The model on `meta`, with the FFN modules each layer needs and, for a compact pack, every
    matrix declared as compact rows (runtime/quant.py) so the loaded uint8 tensors fit by shape."""
    from partinfer.runtime.sparse_ffn import CompactSparseFFN, SparseFFN
    from partinfer.runtime.sparsity import LayerPlan, SparsityConfig
    from partinfer.runtime.tokenwise_ffn import TokenwiseFFN

    every = LayerPlan(torch.arange(cfg.ffn_dim), 0, cfg.ffn_dim)  # a compact model's dense layers
    with torch.device("meta"):
        model = Transformer(cfg)
        for i, plan in plans.items():
            if sparsity.method == "tokenwise":
                compact = (fmt.gate_up, fmt.down) if fmt.compact else None
                model.layers[i].mlp = TokenwiseFFN(cfg, plan, sparsity.token_score, compact, dtype)
            elif fmt.compact:
                model.layers[i].mlp = CompactSparseFFN(cfg, plan, sparsity, fmt.gate_up, fmt.down, dtype)
            else:
                model.layers[i].mlp = SparseFFN(cfg, plan, sparsity)
        if not fmt.compact:
            return model
        for i in range(cfg.n_layers):
            if i not in plans:
                model.layers[i].mlp = CompactSparseFFN(cfg, every, SparsityConfig(method="dense"), fmt.gate_up, fmt.down,
                                                       dtype, dense=True)
            attn = model.layers[i].self_attn
            for linear in (attn.qkv_proj, attn.o_proj):
                linear.weight = torch.nn.Parameter(torch.empty(linear.out_features, fmt.attention.row_bytes(linear.in_features),
                                                               dtype=torch.uint8), requires_grad=False)
        model.embed_tokens = CompactEmbedding(cfg.vocab_size, cfg.dim, fmt.embedding.row_bytes(cfg.dim), dtype)
        if model.lm_head is not None:
            model.lm_head.weight = torch.nn.Parameter(torch.empty(cfg.vocab_size, fmt.embedding.row_bytes(cfg.dim),
                                                                  dtype=torch.uint8), requires_grad=False)
    return model


def attach_compensation(model: Transformer, plans: dict, sparsity: "SparsityConfig") -> None:
    """Give each sparse layer its compensation, when a file is given and some neurons are not loaded
    (methods that load every neuron have nothing to compensate and ignore it)."""
    from partinfer.common.compensation_file import Compensation
    from partinfer.runtime.sparsity import loaded_digest

    n = model.cfg.ffn_dim
    if sparsity.compensation is None or all(plan.loaded.shape[0] == n for plan in plans.values()):
        return
    comp = Compensation.load(sparsity.compensation, model.cfg.fingerprint, loaded_digest(plans, n))
    for i in plans:
        if i in comp.a:
            model.layers[i].mlp.set_compensation(comp.a[i], comp.b[i])


def check_shapes(model: Transformer, state: dict[str, torch.Tensor], model_dir: Path) -> None:
    """Every tensor read must have the shape config.json implies: a mismatch is a broken checkpoint, not a bug."""
    for name, expected in model.state_dict().items():
        got = state.get(name)
        if got is not None and got.shape != expected.shape:
            raise PartinferError(
                f"{model_dir}: weight {name} has shape {list(got.shape)}, but config.json implies {list(expected.shape)}; "
                "the checkpoint and its config.json do not match"
            )


def packed_perms_to_check(model_dir: Path, sparsity: "SparsityConfig", cfg: ModelConfig) -> dict[int, torch.Tensor]:
    """For a packed checkpoint read with a model-level neuron file: the permutation each layer must have."""
    if not is_packed(model_dir) or sparsity.model_neurons is None:
        return {}
    from partinfer.common.neuron_file import NeuronFile

    nf = NeuronFile.load(sparsity.model_neurons, cfg.fingerprint)
    return {i: nf.rank(i).long() for i in range(cfg.n_layers)}


def load_dense_model(model_dir: Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> Transformer:
    """The whole model, every neuron (a packed checkpoint is un-permuted on the fly)."""
    return load_model(model_dir, dtype, device)
