"""`partinfer pack`: rewrite a checkpoint so that partial loads are a few contiguous reads.

Every FFN layer is permuted hot-first by the model-level ranking and bundled per neuron (LLM in a
flash's row-column bundling): `model.layers.{i}.mlp.bundle` [n, 3, d] holds neuron j's gate row,
up row and down column side by side; `model.layers.{i}.mlp.perm` int64 [n] says which original
neuron each packed row is. Loading the k hottest neurons of a layer is then one read. Everything
else is copied unchanged. One shard per layer keeps memory at one layer while packing, and the
directory is written under a temporary name and renamed when complete; `--out` must be new, empty
or an earlier pack (see common.output_dir), so packing never removes a file it did not write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from common.neuron_file import NeuronFile
from common.errors import PartinferError
from runtime.loader import CheckpointReader, is_packed
from runtime.model import ModelConfig
from common.output_dir import replace_output_dir

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


def pack_checkpoint(model_dir: Path, model_neurons: Path, out: Path) -> Path:
    model_dir, out = Path(model_dir), Path(out)
    if is_packed(model_dir):
        raise PartinferError(f"{model_dir} is already packed; pack the original checkpoint")
    cfg = ModelConfig.from_dir(model_dir)
    nf = NeuronFile.load(model_neurons, cfg.fingerprint)
    manifest = {"format": "partinfer-packed", "version": 1, "fingerprint": cfg.fingerprint,
                "model_neurons": str(model_neurons), "neurons_created": nf.created, "source": str(model_dir)}
    with replace_output_dir(out, "pack", inputs=(model_dir, model_neurons), manifest=manifest) as tmp:
        weight_map: dict[str, str] = {}
        with CheckpointReader(model_dir) as reader:
            names = list(reader.shards)
            for i in tqdm(range(cfg.n_layers), desc="pack", unit="layer"):
                prefix = f"model.layers.{i}."
                perm = nf.rank(i).long()
                gate = reader.get(f"{prefix}mlp.gate_proj.weight")
                up = reader.get(f"{prefix}mlp.up_proj.weight")
                down = reader.get(f"{prefix}mlp.down_proj.weight")
                tensors = {
                    f"{prefix}mlp.bundle": torch.stack([gate[perm], up[perm], down.t()[perm]], dim=1).contiguous(),
                    f"{prefix}mlp.perm": perm.contiguous(),
                }
                for name in names:
                    if name.startswith(prefix) and ".mlp." not in name:
                        tensors[name] = reader.get(name)
                shard = f"layer-{i:03d}.safetensors"
                save_file(tensors, tmp / shard, metadata={"format": "pt"})
                weight_map.update({name: shard for name in tensors})
            rest = {name: reader.get(name) for name in names if not name.startswith("model.layers.")}
            save_file(rest, tmp / "rest.safetensors", metadata={"format": "pt"})
            weight_map.update({name: "rest.safetensors" for name in rest})
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        for name in COPIED_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
    return out
