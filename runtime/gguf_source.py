"""Compact rows taken bit for bit from a GGUF file (the embedded default model's source).

A GGUF of a Llama model stores attention q/k/v/o, FFN gate/up/down in Q4_1 (or other types) and
the token embedding in Q8_0, every matrix as rows along its input dimension — the same row layout
as common/formats/blocks.py. Where a GGUF matrix is in the format a packed checkpoint wants, `partinfer
pack` keeps its blocks instead of re-quantizing the bf16 values:
  - gate, up, q, k, v, o and the embedding: rows are output rows, kept as they are (q and k rows
    are put back in Hugging Face order: llama.cpp's converter interleaves each head's rope halves);
  - down is stored [d rows, blocks across 32 neurons]: the packer splits its blocks into per-neuron
    codes and a table of the blocks' scales (runtime.quant.columns_from_rows), the same values.
"""

from __future__ import annotations

from pathlib import Path

import torch

from partinfer.common.errors import PartinferError
from partinfer.common.formats.blocks import BLOCK_FORMATS, BlockFormat
from partinfer.runtime.config import ModelConfig
from partinfer.runtime.quant import dequantize


class GgufRows:
    """Hugging Face tensor name -> compact rows [N, row_bytes] uint8 in HF row order, from a GGUF whose
    tensor types are registered block formats (ggml's type names are our format names)."""

    def __init__(self, path: Path, cfg: ModelConfig):
        import gguf

        try:
            reader = gguf.GGUFReader(Path(path))
        except (OSError, ValueError) as e:
            raise PartinferError(f"cannot read the GGUF source {path} ({e}); re-install it or pack without it") from e
        self.cfg = cfg
        self.tensors = {t.name: t for t in reader.tensors}

    def _hf_to_gguf(self, name: str) -> tuple[str, str | None]:
        """(GGUF name, 'q'/'k' when rows need un-permuting)."""
        if name == "model.embed_tokens.weight":
            return "token_embd.weight", None
        if name == "lm_head.weight":
            return "output.weight", None
        parts = name.split(".")  # model.layers.{i}.{self_attn|mlp}.{proj}.weight
        if len(parts) != 6 or parts[1] != "layers":
            return "", None
        i, proj = parts[2], parts[4]
        gguf_name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}.get(proj, "")
        return f"blk.{i}.{gguf_name}.weight", {"q_proj": "q", "k_proj": "k"}.get(proj)

    def rows(self, name: str, fmt: BlockFormat) -> torch.Tensor | None:
        """The GGUF's own rows for `name` [N, row_bytes] (blocks along the input dimension) when they are in
        `fmt`, else None."""
        gguf_name, rope = self._hf_to_gguf(name)
        t = self.tensors.get(gguf_name)
        if t is None or t.tensor_type.name != fmt.name:
            return None
        return self._hf_row_order(torch.from_numpy(t.data.copy()), rope)  # [N, row_bytes] uint8

    def format_of(self, name: str) -> BlockFormat | None:
        """The registered block format the GGUF stores `name` in, or None (not in the GGUF, or unregistered)."""
        t = self.tensors.get(self._hf_to_gguf(name)[0])
        return None if t is None else BLOCK_FORMATS.get(t.tensor_type.name)

    def values(self, name: str) -> torch.Tensor | None:
        """The source's fp32 values [N, K] in HF row order, de-quantized exactly, or None (not in the GGUF)."""
        gguf_name, rope = self._hf_to_gguf(name)
        t = self.tensors.get(gguf_name)
        if t is None or t.tensor_type.name not in BLOCK_FORMATS:
            return None
        k = int(t.shape[0])  # ggml ne0: the contiguous (input) dimension
        fmt = BLOCK_FORMATS[t.tensor_type.name]
        return self._hf_row_order(dequantize(torch.from_numpy(t.data.copy()), fmt, k), rope)

    def _hf_row_order(self, rows: torch.Tensor, rope: str | None) -> torch.Tensor:
        """Undo llama.cpp's q/k row interleave: GGUF row (head, i, half) is HF row (head, half, i). Its
        converter interleaves them for Llama-family models only (Qwen2's rope reads the halves as HF does)."""
        if rope is None or self.cfg.model_type not in ("llama", "mistral"):
            return rows
        heads = self.cfg.n_heads if rope == "q" else self.cfg.n_kv_heads
        hd = rows.shape[0] // heads
        return rows.reshape(heads, hd // 2, 2, -1).transpose(1, 2).reshape(rows.shape).contiguous()
