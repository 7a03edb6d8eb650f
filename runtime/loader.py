"""Loading a model from its load plan: non-FFN weights by name into a model built on `meta`, and each
FFN layer from only its loaded rows (the FFN module builds itself from them: runtime/ffns.py). An
untied compact embedding stays on disk and is read per token (`DiskEmbedding`).

Every tensor is copied into memory the process owns and the file handle is dropped afterwards, so
RSS reflects exactly the weights we keep (a tensor left memory-mapped only counts once touched).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from partinfer.common.errors import PartinferError
from partinfer.common.formats.blocks import BlockFormat
from partinfer.common.formats.pack_format import bundle_name, down_table_name, matrix_name, perm_name
from partinfer.common.safetensors_io import SafetensorsFile
from partinfer.runtime.checkpoint import CheckpointReader, contiguous_runs, read_fused
from partinfer.runtime.decode import choose_backend
from partinfer.runtime.ffn import FfnRows
from partinfer.runtime.ffns import build_ffn
from partinfer.runtime.kernels import (CompactEmbedding, CompactHead, CompactLinear, DiskEmbedding, MixedCompactLinear,
                                       prompt_chunk_tokens)
from partinfer.runtime.load_plan import LoadPlan
from partinfer.runtime.model import Transformer
from partinfer.runtime.native import cpu_kernels
from partinfer.runtime.process_memory import release_free_heap
from partinfer.runtime.quant import down_table_shape
from partinfer.runtime.sparsity import SparsityConfig
from partinfer.runtime.tokenwise_ffn import TokenwiseFFN, compute_down_norms


def read_ffn_rows(reader: CheckpointReader, plan: LoadPlan, layer: int, neurons: torch.Tensor, device: str) -> FfnRows:
    """Read only `neurons` (original indices, in this order) of one FFN layer.

    Packed checkpoint: coalesced contiguous reads of the [n, 3, d] (or compact [n, bytes]) bundle, one
    read for a hot-first prefix; a compact layer's down table is read whole. Plain checkpoint:
    coalesced row runs of gate/up; down is read whole for its column gather (one layer).
    Float rows come in the checkpoint's dtype (the FFN casts them once)."""
    packed = bundle_name(layer) in reader
    gate_up = plan.layer_format(layer, ("gate_proj", "up_proj")) if packed else None
    down = plan.format_of(matrix_name(layer, "down_proj")) if packed else None
    check_ffn_shapes(reader, plan, layer, gate_up, down)
    if packed:
        perm = reader.get(perm_name(layer)).long()  # packed row j holds original neuron perm[j]
        expected = plan.expected_perm(layer)
        if expected is not None and not torch.equal(perm, expected):
            raise PartinferError(
                f"the packed checkpoint's layer {layer} permutation does not match the model-level neuron file; "
                "pass the neuron file it was packed with, or pack again with `partinfer pack`"
            )
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.shape[0])
        positions = inverse[neurons]  # packed row of each wanted neuron
        order = torch.argsort(positions)
        rows = reader.read_rows(bundle_name(layer), contiguous_runs(positions[order]))  # ascending
        rows = rows if torch.equal(order, torch.arange(len(order))) else rows[torch.argsort(order)]
        rows = rows.to(device=device)
        if gate_up is None:  # [k, 3, d]
            return FfnRows(neurons, rows[:, 0], rows[:, 1], rows[:, 2])
        g = gate_up.row_bytes(plan.cfg.dim)  # [k, bytes]: gate | up blocks | down codes, views of one read
        return FfnRows(neurons, rows[:, :g], rows[:, g : 2 * g], rows[:, 2 * g :],
                       reader.get(down_table_name(layer)).to(device), gate_up, down)
    prefix = f"model.layers.{layer}.mlp"
    order = torch.argsort(neurons)  # read in ascending row order, put back in `neurons` order
    runs = contiguous_runs(neurons[order])
    back = torch.argsort(order)
    gate = reader.read_rows(f"{prefix}.gate_proj.weight", runs)[back]
    up = reader.read_rows(f"{prefix}.up_proj.weight", runs)[back]
    down = reader.get(f"{prefix}.down_proj.weight")  # [d, n]: a column gather needs the whole matrix
    every = torch.equal(neurons, torch.arange(down.shape[1]))
    down_t = down.t() if every else down.t()[neurons]  # a dense layer keeps the matrix as read
    return FfnRows(neurons, gate.to(device), up.to(device), down_t.to(device))


def check_ffn_shapes(reader: CheckpointReader, plan: LoadPlan, layer: int, gate_up: BlockFormat | None,
                     down: BlockFormat | None) -> None:
    """The layer's FFN tensors must have the shapes config.json and the manifest's formats (`gate_up`,
    `down`: None for float rows) imply."""
    n, d = plan.cfg.ffn_dim, plan.cfg.dim
    if bundle_name(layer) in reader:
        bundle = [n, 3, d] if gate_up is None else [n, 2 * gate_up.row_bytes(d) + down.column_code_bytes(d)]
        expected = {bundle_name(layer): bundle, perm_name(layer): [n]}
        if gate_up is not None:
            expected[down_table_name(layer)] = list(down_table_shape(down, n, d))
    else:
        expected = {matrix_name(layer, "gate_proj"): [n, d], matrix_name(layer, "up_proj"): [n, d],
                    matrix_name(layer, "down_proj"): [d, n]}
    for name, shape in expected.items():
        got = reader.file(name).shape(name)
        if got != shape:
            raise PartinferError(f"{plan.checkpoint}: weight {name} has shape {got}, but config.json implies {shape}; "
                                 "the checkpoint and its config.json do not match")


def hf_names(name: str) -> list[str]:
    """transformers tensor names that make up one of our parameters (fused ones are concatenated on dim 0)."""
    if name.startswith("lm_head"):
        return [name]
    hf = f"model.{name}"
    for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # a MixedCompactLinear's parts
        if f".self_attn.qkv_proj.parts.{j}." in hf:
            return [hf.replace(f"qkv_proj.parts.{j}", proj)]
    if ".self_attn.qkv_proj." in hf:
        return [hf.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
    return [hf]


def load_model(
    model_dir: Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", sparsity: SparsityConfig | None = None,
    weights: str | None = None,
) -> Transformer:
    """Plan the load (`LoadPlan.build`: neuron files and manifest read once; packing, when `weights`
    asks for a format the checkpoint does not store) and load it (`load_planned`)."""
    return load_planned(LoadPlan.build(Path(model_dir), sparsity, weights), dtype, device)


def load_planned(plan: LoadPlan, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> Transformer:
    """Build the model on `meta` with compact modules where the checkpoint stores compact rows, give
    each FFN layer a module built from only its loaded rows, and read every other weight by name.

    Dense layers (outside --start-num..--end-num) load every neuron."""
    compiled_cpu = dtype == torch.bfloat16 and str(device).startswith("cpu") and cpu_kernels()  # built now, not in a timed step
    cfg = plan.cfg
    model = build_model(plan, dtype)
    with CheckpointReader(plan.checkpoint) as reader:
        embedding = plan.format_of("model.embed_tokens.weight")
        if embedding is not None and not cfg.tie_embeddings and str(device) == "cpu":  # read per token, never resident
            name = "model.embed_tokens.weight"
            model.embed_tokens = DiskEmbedding(SafetensorsFile(reader.shards[name]), name, cfg.vocab_size, cfg.dim,
                                               embedding, dtype)
        for i in range(cfg.n_layers):
            layer_plan = plan.layers.get(i)
            neurons = layer_plan.loaded if layer_plan is not None else torch.arange(cfg.ffn_dim)
            rows = read_ffn_rows(reader, plan, i, neurons, device)
            model.layers[i].mlp = build_ffn(cfg, layer_plan, rows, plan.sparsity, dtype)
            del rows
        state: dict[str, torch.Tensor] = {}
        for name, meta in model.state_dict().items():
            if meta.is_meta:  # compact matrices keep their uint8 rows; the rest is cast to `dtype`
                state[name] = read_fused(reader, hf_names(name), torch.uint8 if meta.dtype == torch.uint8 else dtype, device)
    check_shapes(model, state, plan.checkpoint)
    model.load_state_dict(state, strict=False, assign=True)
    left = [name for name, t in model.state_dict().items() if t.is_meta]
    if left:
        raise PartinferError(f"{plan.checkpoint}: no weights were read for {left[0]}; the checkpoint is incomplete")
    attach_compensation(model, plan)
    chunk = prompt_chunk_tokens(plan.layer_format(0, ("gate_proj", "up_proj"))) if cfg.n_layers else None
    if chunk is not None:  # the compiled prompt products' own chunk: longer passes would only hold more
        model.prefill_chunk_tokens = chunk
    if compiled_cpu:
        model.use_compiled_ops()
    model.init_buffers(device)
    model.checkpoint_bytes_read = reader.bytes_read
    scaled = [b.mlp for b in model.layers if isinstance(b.mlp, TokenwiseFFN) and b.mlp.token_score == "scaled"]
    if scaled:
        with torch.inference_mode():
            compute_down_norms(scaled)  # a property of the weights, made while the heap is tidy
        release_free_heap()
    model.backend = choose_backend(model)
    for block in model.layers:
        if hasattr(block.mlp, "neuron_ids"):
            block.mlp.neuron_ids = block.mlp.neuron_ids.to(device)
    return model.eval()


def build_model(plan: LoadPlan, dtype: torch.dtype) -> Transformer:
    """The model on `meta`; every matrix the manifest names as compact becomes a compact module in
    its block format (runtime/kernels.py), so the loaded uint8 rows fit by name and shape."""
    cfg = plan.cfg
    with torch.device("meta"):
        model = Transformer(cfg)
        for i, block in enumerate(model.layers):
            attn = block.self_attn
            qkv = [plan.format_of(matrix_name(i, p)) for p in ("q_proj", "k_proj", "v_proj")]
            if len(set(qkv)) > 1 and None not in qkv:  # each part keeps its own blocks
                attn.qkv_proj = MixedCompactLinear(cfg.dim, list(attn.split), qkv, bias=cfg.qkv_bias)
            else:
                fmt = plan.layer_format(i, ("q_proj", "k_proj", "v_proj"))
                if fmt is not None:
                    attn.qkv_proj = compact_linear(attn.qkv_proj, fmt)
            fmt = plan.format_of(matrix_name(i, "o_proj"))
            if fmt is not None:
                attn.o_proj = compact_linear(attn.o_proj, fmt)
        embedding = plan.format_of("model.embed_tokens.weight")
        if embedding is not None:
            model.embed_tokens = CompactEmbedding(cfg.vocab_size, cfg.dim, embedding, dtype)
        head = plan.format_of("lm_head.weight")
        if model.lm_head is not None and head is not None:
            model.lm_head = CompactHead(cfg.dim, cfg.vocab_size, head, bias=model.lm_head.bias is not None)
    return model


def compact_linear(linear: nn.Linear, fmt: BlockFormat) -> CompactLinear:
    return CompactLinear(linear.in_features, linear.out_features, fmt, bias=linear.bias is not None)


def attach_compensation(model: Transformer, plan: LoadPlan) -> None:
    """Give each sparse layer its compensation, when a file is given and some neurons are not loaded
    (methods that load every neuron have nothing to compensate and ignore it)."""
    from partinfer.common.compensation_file import Compensation
    from partinfer.runtime.sparsity import loaded_digest

    n, sparsity = model.cfg.ffn_dim, plan.sparsity
    if sparsity.compensation is None or all(p.loaded.shape[0] == n for p in plan.layers.values()):
        return
    comp = Compensation.load(sparsity.compensation, model.cfg.fingerprint, loaded_digest(plan.layers, n))
    for i in plan.layers:
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


def load_dense_model(model_dir: Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> Transformer:
    """The whole model, every neuron (a packed checkpoint is un-permuted on the fly)."""
    return load_model(model_dir, dtype, device)
