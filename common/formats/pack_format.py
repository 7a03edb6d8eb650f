"""The packed-checkpoint format (`partinfer pack`): tensor names, the manifest, versions, stale checks.

A packed checkpoint is a directory of safetensors shards, one per layer plus `rest.safetensors`, and
the manifest `partinfer_pack.json` (common/output_dir.py writes it). Each FFN layer i is permuted
hot-first by the model-level ranking and bundled per neuron:
  model.layers.{i}.mlp.bundle      [n, 3, d] (bf16: gate row, up row, down column), or [n, bytes]
                                   uint8 (compact: gate row | up row | down column codes)
  model.layers.{i}.mlp.perm        int64 [n]: packed row j holds original neuron perm[j]
  model.layers.{i}.mlp.down_table  [n / block, head_bytes / 2, d] (compact only): the down blocks' heads as 2-byte units (fp16: for Q4_1 and Q8_0 their scales)
Everything else keeps its Hugging Face name.

Down columns. `down` [d, n] stores its blocks along the neurons (row r's block b covers neurons
b·block .. b·block + block - 1), but a partial load needs each neuron's column apart. So a compact pack
splits the blocks: each neuron keeps its own codes, one per output row, packed along d as its
format packs codes; the blocks' scales go into the per-layer table, table[b, :, r] = the scales of
row r's block b. A neuron's block is its *original* index // block, however neurons are reordered.

The manifest is read once per load (`PackManifest.read`) and names, for every compact matrix (by its
Hugging Face name, e.g. model.layers.3.mlp.gate_proj.weight), its block format: nothing infers a
format from a size. It also names what the pack was made from (`source`, `source_identity`: see
`checkpoint_identity`) and with which neuron file (`neurons_digest`, the neuron file's content digest), so a cached copy that no longer
matches its source is rebuilt rather than used; and the SHA-256 of every file it holds (`file_digests`),
checked once per change of a file (common/integrity.py) before the pack is used.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from partinfer.common.errors import PartinferError
from partinfer.common.formats.blocks import BlockFormat, WeightScheme, block_format
from partinfer.common.integrity import check_files, damaged_files
from partinfer.common.output_dir import manifest_name, read_manifest

PACK_COMMAND = "pack"
PACK_MANIFEST = manifest_name(PACK_COMMAND)
PACK_FORMAT = "partinfer-packed"
# 4: every file's digest; 3: every compact matrix's block format by name, the source's identity;
# 2: down as columns + table; 1: down as Q8_0 rows per neuron. bf16 packs read the same in every version.
PACK_VERSION = 4


def bundle_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.bundle"


def perm_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.perm"


def down_table_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.down_table"


def matrix_name(layer: int, proj: str) -> str:
    """The Hugging Face name of one layer's matrix: proj in gate_proj, up_proj, down_proj, q_proj, ..."""
    part = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{part}.{proj}.weight"


@dataclass(frozen=True)
class PackManifest:
    """What a packed checkpoint's manifest says, checked once when read."""

    path: Path
    weights: str  # the WeightScheme name it was packed with
    version: int
    fingerprint: str | None
    model_neurons: str | None
    neurons_digest: str | None
    source: str | None
    source_identity: str | None
    tensor_formats: dict[str, str] = field(default_factory=dict)
    file_digests: dict[str, str] = field(default_factory=dict)  # file name -> SHA-256; empty before version 4

    @classmethod
    def read(cls, model_dir: Path) -> "PackManifest | None":
        """The manifest of a packed checkpoint, or None when `model_dir` is not one."""
        manifest = read_manifest(Path(model_dir), PACK_COMMAND)
        if manifest is None:
            return None
        version = manifest.get("version", 1)
        signed = isinstance(version, int) and version >= 4 and manifest.get("weights", "bf16") != "bf16"
        if ("manifest_sha256" in manifest or signed) and manifest.get("manifest_sha256") != manifest_digest(manifest):
            raise PartinferError(f"{model_dir}/{PACK_MANIFEST} is damaged: it does not match the digest it was written "
                                 "with; pack the original checkpoint again with `partinfer pack`")
        formats = manifest.get("tensor_formats", {})
        if not isinstance(formats, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in formats.items()):
            raise PartinferError(f"{model_dir}/{PACK_MANIFEST} has no valid tensor_formats; pack it again")
        digests = manifest.get("file_digests", {})
        if not isinstance(digests, dict) or not all(isinstance(k, str) and k not in ("", ".", "..") and "/" not in k
                                                    and "\0" not in k and isinstance(v, str) for k, v in digests.items()):
            raise PartinferError(f"{model_dir}/{PACK_MANIFEST} has no valid file_digests; pack it again")
        strings = {key: manifest.get(key) if isinstance(manifest.get(key), str) else None
                   for key in ("fingerprint", "model_neurons", "neurons_digest", "source", "source_identity")}
        weights = manifest.get("weights", "bf16")
        return cls(Path(model_dir), weights if isinstance(weights, str) else "?",
                   version if isinstance(version, int) else 0, tensor_formats=formats, file_digests=digests, **strings)

    @property
    def compact(self) -> bool:
        return self.weights != "bf16"

    @property
    def stale(self) -> bool:
        """A compact pack in a layout this version no longer reads (bf16 packs never change)."""
        return self.compact and self.version < PACK_VERSION

    def check_readable(self) -> None:
        """A one-line error for a pack this version cannot read."""
        if self.stale:
            raise PartinferError(f"{self.path} holds {self.weights} weights in an older layout (pack version "
                                 f"{self.version}); pack it again with `partinfer pack`")
        for name in set(self.tensor_formats.values()):
            block_format(name)  # an unknown format is a one-line error naming it

    @property
    def intact(self) -> bool:
        """Whether every file the pack recorded still matches its digest (hashed once per change of a file)."""
        return not damaged_files(self.path, self.file_digests)

    def check_intact(self) -> None:
        """A one-line error naming a file of the pack whose bytes changed since it was written."""
        check_files(self.path, self.file_digests, "pack the original checkpoint again with `partinfer pack`")

    def format_of(self, name: str) -> BlockFormat | None:
        """The block format of the matrix `name` (its Hugging Face name), None when it is not compact."""
        fmt = self.tensor_formats.get(name)
        return None if fmt is None else block_format(fmt)


# Matrices a pack stores in one format: gate and up share a bundle row. q, k and v may each keep their
# own (a Q4_K_M file mixes Q4_K and Q6_K there); the runtime fuses them per format.
FUSED = (("q_proj",), ("k_proj",), ("v_proj",), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def scheme_matrices(scheme: WeightScheme, n_layers: int, has_lm_head: bool) -> list[tuple[tuple[str, ...], str]]:
    """Every compact matrix under `scheme`, as groups used fused (same format) with the scheme's format
    name for them: [((Hugging Face names), format name)]; empty for bf16."""
    if not scheme.compact:
        return []
    kind = {"q_proj": scheme.attention, "k_proj": scheme.attention, "v_proj": scheme.attention, "o_proj": scheme.attention,
            "gate_proj": scheme.gate_up, "down_proj": scheme.down}
    groups = [(tuple(matrix_name(i, p) for p in projs), kind[projs[0]]) for i in range(n_layers) for projs in FUSED]
    groups.append((("model.embed_tokens.weight",), scheme.embedding))
    if has_lm_head:
        groups.append((("lm_head.weight",), scheme.embedding))
    return groups


def checkpoint_identity(model_dir: Path) -> str:
    """Names a checkpoint's content cheaply: config.json's bytes and, per safetensors file, its name,
    size, modification time and header (tensor names, dtypes, shapes, offsets). A copy with other
    weights, or the same directory rewritten in place, gets another identity; reading it costs a few
    KiB per shard, not a pass over the weights."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config = model_dir / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for shard in sorted(model_dir.glob("*.safetensors")):
        stat = shard.stat()
        digest.update(f"{shard.name}:{stat.st_size}:{stat.st_mtime_ns}:".encode())
        with open(shard, "rb") as f:
            head = f.read(8)
            if len(head) == 8:
                (length,) = struct.unpack("<Q", head)
                digest.update(f.read(min(length, 1 << 26)))
    return digest.hexdigest()[:20]


MANIFEST_BOOKKEEPING = ("output", "command", "files", "manifest_sha256")  # common/output_dir.py's fields, and this digest


def manifest_digest(manifest: dict) -> str:
    """The SHA-256 of a manifest's pack fields (all but common/output_dir.py's bookkeeping): an edited
    format name or digest is refused, not used to read the weights."""
    fields = {k: v for k, v in manifest.items() if k not in MANIFEST_BOOKKEEPING}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def manifest_entry(scheme: WeightScheme, fingerprint: str, model_neurons: Path, neurons_digest: str, source: Path,
                   tensor_formats: dict[str, str], gguf_source: Path | None) -> dict:
    """The manifest fields `partinfer pack` writes (beside common.output_dir's file list)."""
    return {"format": PACK_FORMAT, "version": PACK_VERSION, "fingerprint": fingerprint, "weights": scheme.name,
            "model_neurons": str(model_neurons), "neurons_digest": neurons_digest, "source": str(Path(source).resolve()),
            "source_identity": checkpoint_identity(source), "gguf_source": None if gguf_source is None else str(gguf_source),
            "tensor_formats": tensor_formats}

