"""An `Engine` bundles what a command needs to turn text into text: model, tokenizer, stop ids, device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from partinfer.common.errors import PartinferError
from partinfer.runtime.generate import GenerationResult, SamplingConfig, generate
from partinfer.runtime.loader import load_model
from partinfer.runtime.model import KVCache, Transformer
from partinfer.runtime.prepare import resolve_model
from partinfer.runtime.sparsity import SparsityConfig
from partinfer.runtime.text import TextStream, encode_prompt, load_tokenizer, stop_token_ids

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PartinferError(f"unknown dtype {name!r}; use bf16, fp32 or fp16")
    return DTYPES[name]


def parse_device(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PartinferError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if not name.startswith(("cpu", "cuda")):
        raise PartinferError(f"unknown device {name!r}; use cpu or cuda")
    return name


@dataclass
class Engine:
    model: Transformer
    tokenizer: object
    model_dir: Path
    stop_ids: set[int]

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        return KVCache(self.model.cfg, batch, max_len or self.model.cfg.max_seq_len, self.dtype, self.device)

    def encode(self, text: str, chat_template: bool = True, history: list[dict] | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, text, chat_template, history)

    def generate_text(
        self,
        prompts: list[str],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        chat_template: bool = True,
        on_text: Callable[[str], None] | None = None,
    ) -> tuple[list[str], GenerationResult]:
        """Generate for text prompts; `on_text` streams the first sequence's text as it grows."""
        ids = [self.encode(p, chat_template) for p in prompts]
        stream = TextStream(self.tokenizer, self.stop_ids)

        def on_token(tokens: torch.Tensor) -> None:
            if on_text is not None:
                on_text(stream.push(int(tokens[0])))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        result = generate(self.model, ids, max_new_tokens, sampling, self.stop_ids, on_token=on_token, pad_id=pad)
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
        return texts, result


def load_engine(
    model: str | None = None, dtype: str = "bf16", device: str = "cpu", sparsity: SparsityConfig | None = None,
    weights: str | None = None,
) -> Engine:
    """Resolve `--model`, load the weights that `sparsity` keeps (all by default) in the weight scheme
    `weights` (None: as stored; runtime/load_plan.py) and the tokenizer."""
    model_dir = resolve_model(model)
    torch_model = load_model(model_dir, parse_dtype(dtype), parse_device(device), sparsity, weights)
    tokenizer = load_tokenizer(model_dir)
    return Engine(torch_model, tokenizer, model_dir, stop_token_ids(tokenizer, model_dir))
