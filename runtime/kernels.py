"""Matmul kernels chosen per shape and device, and the linear modules on float or compact weights.

On CPUs without native bf16 arithmetic (AVX2 only), torch's bf16 GEMM is several times slower than
fp32 for prefill-sized inputs, so with many tokens we upcast the bf16 weight to fp32 for the call:
the copy is cheap next to the GEMM, and the weights stay bf16 in memory. Where the CPU has bf16
instructions (AVX512-BF16, AMX) the upcast loses instead, so there bf16 stays bf16. The
measurements behind both rules and the threshold: docs/design.md §7.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from partinfer.common.errors import PartinferError
from partinfer.common.formats.blocks import BlockFormat
from partinfer.common.safetensors_io import SafetensorsFile
from partinfer.runtime.checkpoint import contiguous_runs
from partinfer.runtime.native import cpu_flags
from partinfer.runtime.native import gemv as native_gemv
from partinfer.runtime.native import gemv_k as native_gemv_k
from partinfer.runtime.native import prompt_gemm_available
from partinfer.runtime.native import rows_gemm as native_rows_gemm
from partinfer.runtime.quant import dequantize, native_kernel

UPCAST_MIN_TOKENS = 32  # below it (e.g. batch-8 decode) the weight upcast costs more than it saves


def cpu_prefers_fp32(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether x @ weight runs faster upcast to fp32; `dtype` stands for the weight's dtype when it
    is compact (then the dtype it would be de-quantized to)."""
    dtype = dtype or weight.dtype
    return (
        x.device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16)
        and x.numel() // x.shape[-1] >= UPCAST_MIN_TOKENS
        and not (dtype == torch.bfloat16 and cpu_has_bf16_math())
    )


def cpu_has_bf16_math() -> bool:
    """The CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), so torch's bf16 GEMM beats the upcast."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


# Compact weights are de-quantized for a many-token call in tiles of at most this many bytes (of the
# de-quantized values), each tile multiplied as soon as it exists: no transient larger than a tile.
DEQUANT_TILE_BYTES = 4 << 20
# K-quant rows are multiplied in place by the compiled integer products (runtime/csrc/k_quant_products.h)
# for any number of tokens, each block read once per eight tokens: faster than de-quantizing tiles
# into a float GEMM at every prompt length measured (docs/design.md §10). A longer input runs in
# chunks of this many tokens, so that its 8-bit copy and the column sums' partial outputs stay small.
K_PRODUCT_TOKENS = 128
# The output head on compact rows (Q4_1, Q8_0) takes at most this many tokens through the compiled
# GEMV (`head_linear`): a prompt's last token, de-quantized, would expand the default model's whole
# 49,152 x 576 head (a fifth of its weights) for one row of logits.
HEAD_GEMV_TOKENS = 4


def prompt_chunk_tokens(fmt: BlockFormat | None) -> int | None:
    """Prompt tokens per pass through the layers for FFN rows in `fmt`: K_PRODUCT_TOKENS where compiled
    products take the prompt (K-quants and Q4_1, on AVX2 or AVX-512 VNNI), which run that many tokens at a
    time anyway, so a longer pass only holds more activations and runs no faster (docs/benchmarks.md,
    "Peak memory of a prompt"); None otherwise (float GEMMs and de-quantized tiles, which longer passes
    make faster)."""
    if fmt is None:
        return None
    if fmt.kernel is None and fmt.dequant_kernel is not None:  # a K-quant: its compiled product, any ISA
        return K_PRODUCT_TOKENS
    return K_PRODUCT_TOKENS if fmt.kernel == "q4_1" and prompt_gemm_available() else None


def k_product_kernel(weight: torch.Tensor, fmt: BlockFormat) -> str | None:
    """The compiled K-quant product for a weight in `fmt` (its `dequant_kernel`), or None without one."""
    if weight.dim() != 2 or native_kernel(fmt, weight, torch.float32) != "k":
        return None
    return fmt.dequant_kernel


def in_token_chunks(x: torch.Tensor, fn, dtype: torch.dtype, takes_bf16: bool = False) -> torch.Tensor:
    """fn over x [tokens, k] in chunks of K_PRODUCT_TOKENS tokens, each made a contiguous fp32 copy (with
    `takes_bf16`, for products that read fp32 or bf16 and answer in it: contiguous in x's own dtype when
    it is one of those); the results ([chunk, N]) written into one [tokens, N] tensor of `dtype`. A
    512-token prompt's transients stay one chunk's copies, not the whole prompt's (the peak during generation)."""
    as_is = takes_bf16 and x.dtype in (torch.float32, torch.bfloat16)

    def chunk(t: int) -> torch.Tensor:
        part = x[t : t + K_PRODUCT_TOKENS]
        return (part if as_is else part.float()).contiguous()

    first = fn(chunk(0))
    if x.shape[0] <= K_PRODUCT_TOKENS:
        return first.to(dtype)
    out = torch.empty(x.shape[0], first.shape[1], dtype=dtype, device=x.device)
    out[:K_PRODUCT_TOKENS] = first
    del first
    for t in range(K_PRODUCT_TOKENS, x.shape[0], K_PRODUCT_TOKENS):
        out[t : t + K_PRODUCT_TOKENS] = fn(chunk(t))
    return out


def prompt_positions(x: torch.Tensor) -> bool:
    """x [..., T, k] holds several positions of a sequence (a prompt, T > 1) on the CPU, where the compiled
    kernels run the prompt products (`prompt_gemm_kernel`, runtime/ffn.py `column_linear`), which quantize the
    input to 8 bits. A batch's eager decode step (T = 1) stays where it was (de-quantized Q4_1 weights,
    as the per-sequence copies of the sparse layers in that batch are)."""
    return x.dim() >= 2 and x.shape[-2] > 1 and x.device.type == "cpu" and prompt_gemm_available()


def prompt_gemm_kernel(x: torch.Tensor, weight: torch.Tensor, fmt: BlockFormat) -> str | None:
    """The compiled prompt product ("q4_1" or "q4_k") for this input and weight, or None."""
    kernel = fmt.kernel or fmt.dequant_kernel
    if kernel not in ("q4_1", "q4_k") or weight.dim() != 2 or native_kernel(fmt, weight, torch.float32) is None:
        return None
    return kernel if prompt_positions(x) else None


def gather_rows(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """weight[rows]: F.embedding for float rows (faster than index_select there), indexing for compact ones."""
    return weight[rows] if weight.dtype == torch.uint8 else F.embedding(rows, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           fmt: BlockFormat | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with fp32 compute on CPU for many-token half-precision inputs (result in x's dtype).
    The compiled one-token decode (runtime/decode.py) does not come through here.

    `fmt`: the block format of a compact `weight` (uint8 rows [N, row_bytes], common/formats/blocks.py),
    which the module holding it names. A prompt on Q4_1 or Q4_K rows runs on the integer prompt products
    where the CPU has them (`prompt_gemm_kernel`), K-quant rows on their compiled products; otherwise
    the output rows are de-quantized tile by tile (DEQUANT_TILE_BYTES) into the compute dtype and
    multiplied at once. The weights stay compact in memory and a call adds at most one tile.

    `rows` [R] (no bias): multiply weight[rows] only -> [..., R]; K-quant rows are read in place by the
    compiled product, others gathered first (the token-wise method's chosen neurons)."""
    kernel = None if fmt is None else k_product_kernel(weight, fmt)
    gemm = None if fmt is None else prompt_gemm_kernel(x, weight, fmt)
    if rows is not None and (kernel is None or gemm is not None):  # only the K-quant products read rows in place
        weight, rows = gather_rows(weight, rows), None
    if gemm is not None:  # a prompt on 4-bit rows: in integers, the panels read in place
        b = None if bias is None else bias.float().contiguous()
        y = in_token_chunks(x.reshape(-1, x.shape[-1]), lambda chunk: native_rows_gemm(weight, chunk, gemm, b), x.dtype,
                            takes_bf16=True)
        return y.reshape(*x.shape[:-1], y.shape[-1])  # [..., N | R]
    if fmt is None:
        if weight.dtype == torch.uint8:
            raise TypeError("a compact weight needs its block format (fmt=...)")
        if cpu_prefers_fp32(x, weight):
            b = None if bias is None else bias.float()
            return F.linear(x.float(), weight.float(), b).to(x.dtype)
        return F.linear(x, weight, bias)
    k = x.shape[-1]
    if kernel is not None:
        w, index = weight.contiguous(), None if rows is None else rows.contiguous()
        b = None if bias is None else bias.float()

        def product(chunk: torch.Tensor) -> torch.Tensor:  # [c, k] fp32 -> [c, N|R] fp32, the bias added before rounding
            y = native_gemv_k(w, chunk, kernel, index)
            return y if b is None else y.add_(b)

        y = in_token_chunks(x.reshape(-1, k), product, x.dtype)  # [tokens, N|R]
        return y.reshape(*x.shape[:-1], y.shape[-1])
    wide = cpu_prefers_fp32(x, weight, x.dtype)
    compute = torch.float32 if wide else x.dtype
    xc = x.to(compute)
    tile_rows = max(1, DEQUANT_TILE_BYTES // (k * torch.empty((), dtype=compute).element_size()))
    if tile_rows >= weight.shape[0]:
        y = F.linear(xc, dequantize(weight, fmt, k, compute), None if bias is None else bias.to(compute))
        return y.to(x.dtype)
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=compute, device=x.device)
    for r0 in range(0, weight.shape[0], tile_rows):
        r1 = min(r0 + tile_rows, weight.shape[0])
        tile = dequantize(weight[r0:r1], fmt, k, compute)  # [r1 - r0, k]
        out[..., r0:r1] = F.linear(xc, tile)
    if bias is not None:
        out += bias.to(compute)
    return out.to(x.dtype)


def head_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fmt: BlockFormat) -> torch.Tensor:
    """The output head x [..., k] -> [..., V]: up to HEAD_GEMV_TOKENS tokens of compact rows through the
    compiled GEMV, one token at a time (the input quantized to 8 bits, as every decode step reads the
    head), more through `linear`. Every method shares the head, so their tokens stay comparable."""
    k = x.shape[-1]
    tokens = x.numel() // k
    if tokens > HEAD_GEMV_TOKENS or weight.dim() != 2 or native_kernel(fmt, weight, torch.float32) != "rows":
        return linear(x, weight, bias, fmt)
    w, flat = weight.contiguous(), x.reshape(tokens, k).float()
    y = torch.stack([native_gemv(w, flat[t].contiguous()) for t in range(tokens)])  # [tokens, V] fp32
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear whose forward goes through `linear` (same parameters, same state-dict names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class CompactLinear(nn.Module):
    """A linear layer on compact rows (gpt-fast's WeightOnlyInt8Linear, for ggml blocks): weight
    [out, row_bytes] uint8 in `fmt`, an optional float bias; the same state-dict names as nn.Linear, so
    a packed checkpoint's rows load by name. `fmt` is the module's own: nothing is guessed from sizes."""

    def __init__(self, in_features: int, out_features: int, fmt: BlockFormat, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.weight = nn.Parameter(torch.empty(out_features, fmt.row_bytes(in_features), dtype=torch.uint8),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return linear(x, self.weight, self.bias, self.fmt)


class CompactHead(CompactLinear):
    """An untied output head on compact rows: a prompt's last token through the compiled GEMV (`head_linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., V]
        return head_linear(x, self.weight, self.bias, self.fmt)


class DiskEmbedding(nn.Module):
    """An untied model's token embedding left on disk: each lookup reads only its tokens' compact rows
    with positioned reads (one row per distinct token) and de-quantizes them, so the matrix (131 MB in
    Q4_K on the 1.5B coding model) never becomes resident. The file stays open as long as the module."""

    def __init__(self, file: SafetensorsFile, name: str, vocab_size: int, dim: int, fmt: BlockFormat,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if file.shape(name) != [vocab_size, fmt.row_bytes(dim)]:
            raise PartinferError(f"{file.path}: {name} is {file.shape(name)}, not [{vocab_size}, {fmt.row_bytes(dim)}] "
                                 f"{fmt.name} rows; the checkpoint and its config.json do not match")
        self.file, self.name, self.vocab_size, self.dim, self.fmt, self.dtype = file, name, vocab_size, dim, fmt, dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [...] -> [..., D]
        ids, inverse = torch.unique(tokens.flatten().cpu(), return_inverse=True)  # sorted, distinct
        if ids.numel() and (ids[0] < 0 or ids[-1] >= self.vocab_size):
            raise IndexError(f"token id out of the vocabulary of {self.vocab_size}")
        rows = self.file.read_rows(self.name, contiguous_runs(ids))  # [u, row_bytes], adjacent ids in one read
        values = dequantize(rows, self.fmt, self.dim, self.dtype)[inverse]  # [tokens, D]
        return values.reshape(*tokens.shape, self.dim).to(tokens.device)

    def __del__(self) -> None:
        self.file.close()


class MixedCompactLinear(nn.Module):
    """Fused output blocks in different compact formats (q, k and v of a Q4_K_M model: Q4_K, Q4_K,
    Q6_K): one CompactLinear per part (state names `<name>.parts.<j>.weight`, bias as one vector), the
    outputs concatenated. The compiled decode, which takes one matrix, does not take it."""

    def __init__(self, in_features: int, out_parts: list[int], formats: list[BlockFormat], bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, sum(out_parts)
        self.parts = nn.ModuleList(CompactLinear(in_features, out, fmt) for out, fmt in zip(out_parts, formats))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., sum(out_parts)]
        y = torch.cat([part(x) for part in self.parts], dim=-1)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Embedding(nn.Embedding):
    """nn.Embedding that can also be the tied output head (`attend`)."""

    def attend(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., V]
        return linear(x, self.weight)


class CompactEmbedding(nn.Module):
    """The token embedding as compact rows: weight [V, row_bytes] uint8 in `fmt`; a lookup de-quantizes
    only the looked-up rows; as the tied output head it is `head_linear`."""

    def __init__(self, vocab_size: int, dim: int, fmt: BlockFormat, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, fmt.row_bytes(dim), dtype=torch.uint8), requires_grad=False)
        self.dim, self.fmt, self.dtype = dim, fmt, dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [...] -> [..., D]
        return dequantize(self.weight[tokens], self.fmt, self.dim, self.dtype)

    def attend(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., V]
        return head_linear(x, self.weight, None, self.fmt)
