"""`partinfer pack`: rewrite a checkpoint so that partial loads are a few contiguous reads.

Every FFN layer is permuted hot-first by the model-level ranking and bundled per neuron (LLM in a
flash's row-column bundling): `model.layers.{i}.mlp.bundle` [n, 3, d] holds neuron j's gate row,
up row and down column side by side; `model.layers.{i}.mlp.perm` int64 [n] says which original
neuron each packed row is. Loading the k hottest neurons of a layer is then one read. Compact
packs hold [n, bytes] bundles (gate and up rows, down codes) and each layer's down block scales,
`model.layers.{i}.mlp.down_table` [n / block, head_bytes / 2, d] fp16 (common/formats/pack_format.py, "Down columns"). Everything
else is copied unchanged. One shard per layer keeps memory at one layer while packing, and the
directory is written under a temporary name and renamed when complete; `--out` must be new, empty
or an earlier pack (see common.output_dir), so packing never removes a file it did not write.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from partinfer.common.errors import PartinferError
from partinfer.common.formats.blocks import BlockFormat, WeightScheme, block_format, weight_scheme
from partinfer.common.formats.pack_format import (PACK_COMMAND, PackManifest, bundle_name, checkpoint_identity,
                                                  down_table_name, manifest_digest, manifest_entry, perm_name,
                                                  scheme_matrices)
from partinfer.common.integrity import directory_digests
from partinfer.common.neuron_file import NeuronFile
from partinfer.common.output_dir import replace_output_dir
from partinfer.runtime.checkpoint import CheckpointReader
from partinfer.runtime.gguf_source import GgufRows
from partinfer.runtime.config import ModelConfig
from partinfer.runtime.quant import columns_from_rows

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


class CompactSource:
    """Compact rows of a checkpoint's matrices: the GGUF's own blocks where it has them in the wanted
    format, else quantized from the most exact values there are (the GGUF's, else the checkpoint's)."""

    def __init__(self, reader: CheckpointReader, gguf: GgufRows | None):
        self.reader, self.gguf = reader, gguf
        self.copied = self.quantized = 0  # matrices taken bit for bit / re-quantized

    def rows(self, name: str, fmt: BlockFormat) -> torch.Tensor:
        rows = self.gguf.rows(name, fmt) if self.gguf is not None else None
        if rows is not None:
            self.copied += 1
            return rows
        self.quantized += 1
        return fmt.quantize(self.values(name))

    def values(self, name: str) -> torch.Tensor:
        """A matrix's values: the GGUF's exact de-quantized ones where it has them, else the checkpoint's."""
        values = self.gguf.values(name) if self.gguf is not None else None
        return self.reader.get(name).float() if values is None else values


def gguf_source(model_dir: Path) -> Path | None:
    """The GGUF a checkpoint was converted from by `partinfer prepare`, when it is still there."""
    from partinfer.common.output_dir import read_manifest
    from partinfer.runtime.prepare import default_gguf_path, default_model_dir

    if Path(model_dir).resolve() == default_model_dir().resolve():  # converted before manifests named the source
        return default_gguf_path()
    manifest = read_manifest(model_dir, "prepare") or {}
    source = manifest.get("source")
    return Path(source) if isinstance(source, str) and source.endswith(".gguf") and Path(source).is_file() else None


def pack_checkpoint(model_dir: Path, model_neurons: Path, out: Path, weights: str = "bf16",
                    neurons: NeuronFile | None = None) -> Path:
    """Pack `model_dir` hot-first by `model_neurons` into `out`, in the weight scheme `weights` (bf16, q4,
    int8); `neurons`: that file, when the caller has read it already."""
    model_dir, out = Path(model_dir), Path(out)
    scheme = weight_scheme(weights)
    if PackManifest.read(model_dir) is not None:
        raise PartinferError(f"{model_dir} is already packed; pack the original checkpoint")
    cfg = ModelConfig.from_dir(model_dir)
    nf = neurons if neurons is not None else NeuronFile.load(model_neurons, cfg.fingerprint)
    gguf = gguf_source(model_dir) if scheme.compact else None
    gguf_rows = GgufRows(gguf, cfg) if gguf is not None else None
    formats = matrix_formats(cfg, scheme, gguf_rows)
    manifest = manifest_entry(scheme, cfg.fingerprint, model_neurons, nf.digest, model_dir,
                              {name: fmt.name for name, fmt in formats.items()}, gguf)
    with replace_output_dir(out, PACK_COMMAND, inputs=(model_dir, model_neurons), manifest=manifest) as tmp:
        weight_map: dict[str, str] = {}
        with CheckpointReader(model_dir) as reader:
            names = list(reader.shards)
            source = CompactSource(reader, gguf_rows)
            for i in tqdm(range(cfg.n_layers), desc="pack", unit="layer"):
                prefix = f"model.layers.{i}."
                perm = nf.rank(i).long()
                bundle, down_table = ffn_bundle(reader, source, prefix, formats)
                tensors = {bundle_name(i): bundle[perm].contiguous(), perm_name(i): perm.contiguous()}
                if down_table is not None:
                    tensors[down_table_name(i)] = down_table
                for name in names:
                    if name.startswith(prefix) and ".mlp." not in name:
                        tensors[name] = source.rows(name, formats[name]) if name in formats else reader.get(name)
                shard = f"layer-{i:03d}.safetensors"
                save_file(tensors, tmp / shard, metadata={"format": "pt"})
                weight_map.update({name: shard for name in tensors})
            rest = {name: source.rows(name, formats[name]) if name in formats else reader.get(name)
                    for name in names if not name.startswith("model.layers.")}
            save_file(rest, tmp / "rest.safetensors", metadata={"format": "pt"})
            weight_map.update({name: "rest.safetensors" for name in rest})
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        for name in COPIED_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        manifest["file_digests"] = directory_digests(tmp)  # the manifest is written when the block ends
        manifest["manifest_sha256"] = manifest_digest(manifest)
        if scheme.compact:  # a report, not output: `--json` stdout holds only JSON
            print(f"compact weights ({scheme.name}): {source.copied} matrices copied bit for bit from {gguf}, "
                  f"{source.quantized} quantized" if gguf else f"compact weights ({scheme.name}): all matrices quantized",
                  file=sys.stderr)
    return out


def matrix_formats(cfg: ModelConfig, scheme: WeightScheme, gguf: GgufRows | None) -> dict[str, BlockFormat]:
    """Each compact matrix's block format (Hugging Face name -> format): the scheme's for its kind, or,
    for a scheme that keeps the source's blocks, the GGUF's own where it stores every matrix of a fused
    group in one registered format. Every width a format splits must hold whole blocks (checked)."""
    formats = {}
    for names, wanted in scheme_matrices(scheme, cfg.n_layers, not cfg.tie_embeddings):
        own = {gguf.format_of(n) for n in names} if scheme.keep_source and gguf is not None else {None}
        fmt = own.pop() if len(own) == 1 and None not in own else block_format(wanted)
        formats.update({n: fmt for n in names})
    for name, fmt in formats.items():
        fmt.check_width(cfg.ffn_dim if name.endswith("down_proj.weight") else cfg.n_heads * cfg.head_dim
                        if name.endswith("o_proj.weight") else cfg.dim)
        if name.endswith("down_proj.weight"):
            fmt.check_width(cfg.dim)  # its columns are packed along d too
    return formats


def ffn_bundle(reader: CheckpointReader, source: CompactSource, prefix: str,
               formats: dict[str, BlockFormat]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's neurons in original order, one row each, and the down block table (compact only):
    [n, 3, d] (bf16: gate row, up row, down column) or [n, bytes] (compact: gate and up rows, then the
    down column's codes) with the table [n / block, head_bytes / 2, d]."""
    names = {p: f"{prefix}mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    if names["gate"] not in formats:
        gate, up, down = (reader.get(names[p]) for p in ("gate", "up", "down"))
        return torch.stack([gate, up, down.t()], dim=1), None
    gate = source.rows(names["gate"], formats[names["gate"]])
    up = source.rows(names["up"], formats[names["up"]])
    down_fmt = formats[names["down"]]
    down_codes, down_table = columns_from_rows(source.rows(names["down"], down_fmt), down_fmt)
    return torch.cat([gate, up, down_codes], dim=1), down_table


def cached_pack(model_dir: Path, model_neurons: Path, weights: str, neurons: NeuronFile | None = None) -> PackManifest:
    """A packed copy of `model_dir` ordered by `model_neurons`, in scheme `weights`, made once in the
    cache (`$PARTINFER_HOME/packed/`) and reused: what `--weights` and `partinfer memory` load. Returns
    the copy's manifest (its `path` is the copy); `neurons`: the file at `model_neurons`, when read already.

    The entry is named by the checkpoint's content identity, the neuron file's digest and the scheme,
    and its manifest must still name that source and identity: a directory of the same name with other
    weights, or a model changed in place, gets a pack of its own; a stale, foreign or damaged entry
    (a manifest that cannot be read, a file that no longer matches its digest) is rebuilt, never used."""
    from partinfer.common.paths import cache_home

    if neurons is None:
        neurons = NeuronFile.load(model_neurons, ModelConfig.from_dir(model_dir).fingerprint)
    identity, digest = checkpoint_identity(model_dir), neurons.digest
    out = cache_home() / "packed" / f"{Path(model_dir).name}-{identity[:12]}-{digest[:10]}-{weights}"
    try:
        manifest = PackManifest.read(out)
    except PartinferError:
        manifest = None
    current = (manifest is not None and not manifest.stale and manifest.weights == weights
               and manifest.source == str(Path(model_dir).resolve()) and manifest.source_identity == identity
               and manifest.neurons_digest == digest and manifest.intact)
    if current:
        return manifest
    if manifest is None and out.exists():  # our cache entry, but unreadable: make it again
        shutil.rmtree(out)
    pack_checkpoint(model_dir, model_neurons, out, weights, neurons)
    return PackManifest.read(out)
