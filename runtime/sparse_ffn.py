"""`SparseFFN`: an FFN layer that holds only its loaded neurons and computes only the active ones at decode.

Life of a sentence (`begin_prompt` / `end_prompt`, which `prefill(..., select=True)` calls around the prompt):
  prefill  every loaded neuron is computed; for methods that select per sentence, each sequence's
           token-wise core neurons are counted (padding excluded), summed over the prompt's chunks;
  select   per sequence, active = base ∪ ε (`selection.sentence_active`);
  decode   only the active neurons' weights are read: φ of the FFN bytes per token.
With `--refit-tokens N` (batch 1), the prefill also keeps the last N tokens' inputs, and the end of the
prompt fits a map for what the loaded but inactive neurons add (runtime/sentence_refit.py).
A new prompt (a chat turn) is a new sentence and re-selects; the KV cache is untouched.

Layout, chosen by measurement (docs/design.md §7: a GEMV streams a contiguous [out, in] weight many
times faster than a transposed or column-strided one):
  gate_up    [k, 2, d]  neuron i's gate row and up row side by side (one GEMV computes both),
  down_head  [d, h]     down columns of the first h loaded positions (the active prefix),
  down_tail  [d, k-h]   the other loaded columns.
With one sequence, selection *reorders the loaded neurons in place* so that the active ones are the
prefix: decode then reads `gate_up[:m]` (a contiguous prefix) and `down_head` (contiguous), and no
compact copy exists — partinfer holds no more memory than load-only. Base neurons stay at positions
0..n_base-1. A batch with different active sets per sequence gathers per-sequence compact copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from partinfer.common.formats.blocks import BlockFormat
from partinfer.runtime.config import ACTIVATIONS, ModelConfig
from partinfer.runtime.decode_contract import FfnKind, FfnWeights
from partinfer.runtime.ffn import FeedForward, FfnRows, column_linear, compact_gated_activations, decode_kernels
from partinfer.runtime.kernels import linear
from partinfer.runtime.model import Transformer
from partinfer.runtime.quant import dequantize, dequantize_columns, down_table_shape, neuron_scale_groups
from partinfer.runtime.sentence_refit import PromptInputs, fit_sentence_map
from partinfer.runtime.selection import STATISTICS_TOKENS, add_abs_sums, real_token_weights, sentence_active, top_count_mask
from partinfer.runtime.sparsity import LayerPlan, SparsityConfig
from partinfer.runtime.tokenwise_ffn import TokenwiseFFN

SELECTING_METHODS = ("coreinfer", "partinfer")


class SparseFFN(FeedForward):
    def __init__(self, cfg: ModelConfig, plan: LayerPlan, sparsity: SparsityConfig):
        super().__init__()
        k, d = plan.loaded.shape[0], cfg.dim
        self.gate_up = nn.Parameter(torch.empty(k, 2, d))
        self.down_head = nn.Parameter(torch.empty(d, plan.n_active))
        self.down_tail = nn.Parameter(torch.empty(d, k - plan.n_active))
        self._init_state(cfg, plan, sparsity)

    @classmethod
    def from_rows(cls, cfg: ModelConfig, plan: LayerPlan, rows: FfnRows, sparsity: SparsityConfig,
                  dtype: torch.dtype) -> "SparseFFN":
        """The layer from its loaded rows (plan order): float rows, or compact ones (`CompactSparseFFN`)."""
        if rows.compact:
            return CompactSparseFFN.from_rows(cfg, plan, rows, sparsity, dtype)
        with torch.device("meta"):
            ffn = cls(cfg, plan, sparsity)
        h = plan.n_active
        down_t = rows.down_t.to(dtype)
        own = dict(memory_format=torch.contiguous_format)  # clone: a view would keep down_t's storage alive
        ffn.gate_up = nn.Parameter(torch.stack([rows.gate, rows.up], dim=1).to(dtype), requires_grad=False)  # [k, 2, d]
        ffn.down_head = nn.Parameter(down_t[:h].t().clone(**own), requires_grad=False)  # [d, h]
        ffn.down_tail = nn.Parameter(down_t[h:].t().clone(**own), requires_grad=False)  # [d, k - h]
        ffn.neuron_ids = rows.neuron_ids.clone()
        return ffn

    def _init_state(self, cfg: ModelConfig, plan: LayerPlan, sparsity: SparsityConfig) -> None:
        """Everything but the weights: shared with the compact layout."""
        k = plan.loaded.shape[0]
        self.register_buffer("neuron_ids", plan.loaded.clone().to("cpu"), persistent=False)  # [k] original ids
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.method = sparsity.method
        self.n_base, self.n_active = plan.n_base, plan.n_active
        self.n_core = max(1, min(k, round(sparsity.token_sparsity * cfg.ffn_dim)))  # a token's core neurons
        self.core_score = sparsity.core_score
        self.selects = sparsity.method in SELECTING_METHODS
        self.phase = "prefill"
        self.core_counts: torch.Tensor | None = None  # [B, k]
        self.abs_sums: torch.Tensor | None = None  # [B, k]
        self.active: torch.Tensor | None = None  # [B, m] positions into the loaded set
        self.c_gate_up: torch.Tensor | None = None  # [B, 2m, d] per-sequence copies (batches only)
        self.c_down: torch.Tensor | None = None  # [B, d, m]
        self.decode_record: FfnWeights | None = None  # built at end_prompt for the compiled decode
        self.model_dim, self.refit_tokens = cfg.dim, sparsity.refit_tokens
        self.prompt_inputs: PromptInputs | None = None  # the prompt's last refit_tokens FFN inputs (batch 1)
        self.sentence_map: tuple[torch.Tensor, torch.Tensor] | None = None  # (X [t, D], Aᵀ [D, t]), this sentence's

    @property
    def n_loaded(self) -> int:
        return self.gate_up.shape[0]

    @property
    def gate(self) -> torch.Tensor:  # [k, d] view
        return self.gate_up[:, 0]

    @property
    def up(self) -> torch.Tensor:  # [k, d] view
        return self.gate_up[:, 1]

    @property
    def down(self) -> torch.Tensor:  # [d, k], a copy
        return torch.cat([self.down_head, self.down_tail], dim=1)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.gate_up.dtype

    def begin_prompt(self, batch: int, device: torch.device) -> None:
        self.phase = "prefill"
        self.core_counts = self.abs_sums = None
        self.sentence_map = self.prompt_inputs = None
        if self.refit_tokens and batch == 1 and self.n_active < self.n_loaded:
            self.prompt_inputs = PromptInputs(self.refit_tokens, self.model_dim, self.compute_dtype, device)
        if self.selects:
            self.core_counts, self.abs_sums = (torch.zeros(batch, self.n_loaded, device=device) for _ in range(2))

    def end_prompt(self) -> None:
        """Choose the active set (per sequence) and lay the weights out for decode."""
        order = None
        if self.selects and self.core_counts is not None:
            # abs_sums orders ties like mean |a| does: the token count is the same for every neuron of a sequence.
            order = self.set_active(sentence_active(self.core_counts, self.abs_sums, self.n_base, self.n_active))
        self.phase = "decode"
        self.core_counts = self.abs_sums = None
        self.decode_record = None
        if self.c_gate_up is None and self.act is F.silu:  # one active prefix (batch 1), SiLU
            self.decode_record = self._prefix_record()
        if order is not None:
            # Last, after every tensor this layer keeps was made: one made between the reorder's transients
            # took a bite of their freed space, which the next layer's same-sized transients then no longer
            # fitted, and the heap grew layer by layer.
            self._reorder(order)
        if self.prompt_inputs is not None and self.prompt_inputs.count:  # batch 1: one active prefix
            inputs = self.prompt_inputs.tokens()  # [t, D]
            with torch.no_grad():
                self.sentence_map = fit_sentence_map(inputs, self._inactive_output(inputs[None])[0], self.compute_dtype)
        self.prompt_inputs = None

    def _inactive_output(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> what the loaded neurons after the active prefix add [B, T, D] (one sequence's layout)."""
        tail = self.n_loaded - self.n_active
        a = self._act(linear(x, self.gate_up[self.n_active :].view(2 * tail, -1)))  # [B, T, tail]
        return linear(a, self.down_tail)

    def compensate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = super().compensate(x, y)
        if self.sentence_map is None:
            return y
        inputs, outputs = self.sentence_map
        return y + linear(linear(x, inputs), outputs)

    def decode_compensation(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        offline = super().decode_compensation()
        if self.sentence_map is None or offline is None:
            return self.sentence_map or offline
        return torch.cat([offline[0], self.sentence_map[0]]), torch.cat([offline[1], self.sentence_map[1]], dim=1)

    def _prefix_record(self) -> FfnWeights:
        m = self.n_active
        gate_up = self.gate_up[:m].view(2 * m, -1)  # [2m, d], gate/up rows interleaved, in place
        return FfnWeights(FfnKind.INTERLEAVED, gate_up, self.down_head, gate_up)

    def _gate_up_rows(self, active: torch.Tensor) -> torch.Tensor:
        """active [B, m] -> [B, 2m, d] float copies of those neurons' gate/up rows (interleaved)."""
        return self.gate_up[active].reshape(active.shape[0], 2 * active.shape[1], -1)

    def _activations(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """x [B, T, D] -> the first m loaded neurons' activations [B, T, m]."""
        return self._act(linear(x, self.gate_up[:m].view(2 * m, -1)))  # gate/up pre-activations [B, T, 2m], interleaved

    def _down_of(self, a: torch.Tensor) -> torch.Tensor:
        """a [B, T, j] activations of the first j loaded positions (j = n_active or all) -> [B, T, D]."""
        y = linear(a[..., : self.n_active], self.down_head)
        if a.shape[-1] > self.n_active and self.down_tail.shape[1]:
            y = y + linear(a[..., self.n_active :], self.down_tail)
        return y

    def set_active(self, active: torch.Tensor) -> torch.Tensor | None:
        """active [B, m] positions into the loaded set (sorted, base first). One sequence: its neurons become
        the loaded set's prefix; returns the order [k] the caller must then lay the weights out in
        (`_reorder`), None when they already are. Several: per-sequence copies; returns None."""
        self.c_gate_up = self.c_down = None
        if active.shape[0] == 1:
            self.active = torch.arange(self.n_active, device=active.device)[None]
            return self._front_order(active[0])
        B, m = active.shape
        down = self.down
        self.active = active
        self.c_gate_up = self._gate_up_rows(active)  # [B, 2m, d], gate/up interleaved
        self.c_down = torch.stack([down[:, a] for a in active])  # [B, d, m]
        return None

    @torch.no_grad()
    def _front_order(self, active: torch.Tensor) -> torch.Tensor | None:
        """The order [k] of the loaded neurons that makes `active` (sorted positions) the prefix, with
        `neuron_ids` already in it; None when it is the present order. The weights follow in `_reorder`."""
        keep = torch.ones(self.n_loaded, dtype=torch.bool, device=active.device)
        keep[active] = False
        order = torch.cat([active, keep.nonzero()[:, 0]])
        chosen = order[self.n_base : self.n_active]  # the sentence's own neurons, in id order (ids_sorted_within)
        order[self.n_base : self.n_active] = chosen[torch.argsort(self.neuron_ids[chosen.to(self.neuron_ids.device)])
                                                    .to(chosen.device)]
        if torch.equal(order, torch.arange(self.n_loaded, device=order.device)):
            return None
        self.neuron_ids = self.neuron_ids[order.to(self.neuron_ids.device)]
        return order

    def _reorder(self, order: torch.Tensor) -> None:
        """Permute the loaded neurons' weights by `order` [k], in their existing storage: reallocating
        would leave sub-MiB holes in the heap every sentence."""
        down = self.down  # one layer's down, transient
        # index_select copies whole rows; advanced indexing (gate_up[order]) went element by element, 4-5x slower
        self.gate_up.copy_(torch.index_select(self.gate_up, 0, order))
        self.down_head.copy_(torch.index_select(down, 1, order[: self.n_active]))
        self.down_tail.copy_(torch.index_select(down, 1, order[self.n_active :]))

    def decode_weights(self) -> FfnWeights | None:
        """The active prefix for the compiled decode, fixed from one end_prompt to the next; None while
        prefilling, with per-sequence sets, or for non-SiLU models."""
        return self.decode_record if self.phase == "decode" else None

    def active_neuron_ids(self) -> torch.Tensor:
        """[B, m] original neuron indices computed at decode."""
        if self.active is None:
            return self.neuron_ids[: self.n_active][None]
        return self.neuron_ids.to(self.active.device)[self.active]

    def decode_bytes(self) -> int:
        """Weight bytes one decode token reads in this layer (batch 1)."""
        m = self.n_active
        return (2 * m * self.gate_up.shape[2] + self.down_head.numel()) * self.gate_up.element_size()

    def _record(self, a: torch.Tensor) -> None:
        """Count each sequence's token-wise core neurons over real prompt tokens. a [B, T, k], taken
        STATISTICS_TOKENS tokens at a time: the fp32 masks of a whole long prompt were the largest transient
        of its prefill (about 50 MB for 512 tokens of the 1.5B model)."""
        T = a.shape[1]
        real = real_token_weights(self.token_mask, T, a.device)  # [B, T, 1] or None
        for t in range(0, T, STATISTICS_TOKENS):
            core = top_count_mask(a[:, t : t + STATISTICS_TOKENS], self.n_core, self.core_score).float()  # [B, t', k]
            if real is not None:
                core.mul_(real[:, t : t + STATISTICS_TOKENS])
            self.core_counts.add_(core.sum(1))
            del core
        add_abs_sums(self.abs_sums, a, real)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        """[..., 2m] interleaved gate/up pre-activations -> a [..., m]."""
        h = h.unflatten(-1, (-1, 2))
        return self.act(h[..., 0]) * h[..., 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        return self.compensate(x, self._computed(x))

    def _computed(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]: the computed neurons' output
        if self.phase == "decode":
            if self.c_gate_up is not None:  # per-sequence active sets
                a = self._act(torch.bmm(x, self.c_gate_up.transpose(1, 2)))  # [B, T, m]
                return torch.bmm(a, self.c_down.transpose(1, 2))  # [B, T, D]
            a = self._activations(x, self.n_active)  # [B, T, m]
            return self._down_of(a)
        a = self._activations(x, self.n_loaded)  # [B, T, k]
        if self.phase == "prefill" and self.selects:
            self._record(a)
        if self.phase == "prefill" and self.prompt_inputs is not None:
            real = None if self.token_mask is None else self.token_mask[0].to(torch.bool)
            self.prompt_inputs.add(x[0] if real is None else x[0][real])
        return self._down_of(a)


class CompactSparseFFN(SparseFFN):
    """`SparseFFN` on compact rows (common/formats/blocks.py): every matrix is per-neuron rows of blocks.

      gate_up     [k, 2, row_bytes] uint8   neuron i's gate and up rows side by side, in `gate_up_format`,
      down_t      [k, code_bytes] uint8     neuron i's down column codes, in `down_format`,
      down_table  [n / block, head / 2, d]  the layer's down block heads (2-byte units); neuron i's
                                            block is neuron_ids[i] // block.
    The active prefix is `gate_up[:m]` and `down_t[:m]`, reordered in place as in SparseFFN; the
    compiled decode reads them as FfnKind.ROWS when both formats have kernels."""

    def __init__(self, cfg: ModelConfig, plan: LayerPlan, sparsity: SparsityConfig, gate_up_format: BlockFormat,
                 down_format: BlockFormat, dtype: torch.dtype = torch.bfloat16):
        """`dtype`: what the rows are de-quantized to where the eager path computes with them."""
        FeedForward.__init__(self)  # not SparseFFN's: its bf16 weights are not made
        k, d = plan.loaded.shape[0], cfg.dim
        self.dim, self.dtype = d, dtype
        self.gate_up_format, self.down_format = gate_up_format, down_format
        self.gate_up = nn.Parameter(torch.empty(k, 2, gate_up_format.row_bytes(d), dtype=torch.uint8), requires_grad=False)
        self.down_t = nn.Parameter(torch.empty(k, down_format.column_code_bytes(d), dtype=torch.uint8), requires_grad=False)
        self.down_table = nn.Parameter(torch.empty(down_table_shape(down_format, cfg.ffn_dim, d), dtype=torch.float16),
                                       requires_grad=False)
        self._init_state(cfg, plan, sparsity)

    @classmethod
    def from_rows(cls, cfg: ModelConfig, plan: LayerPlan, rows: FfnRows, sparsity: SparsityConfig,
                  dtype: torch.dtype) -> "CompactSparseFFN":
        with torch.device("meta"):
            ffn = cls(cfg, plan, sparsity, rows.gate_up_format, rows.down_format, dtype)
        # each final tensor made once from the rows (views of one read), no other transient
        ffn.gate_up = nn.Parameter(torch.stack([rows.gate, rows.up], dim=1), requires_grad=False)  # [k, 2, bytes]
        ffn.down_t = nn.Parameter(rows.down_t.clone(memory_format=torch.contiguous_format), requires_grad=False)
        ffn.down_table = nn.Parameter(rows.down_table, requires_grad=False)
        ffn.neuron_ids = rows.neuron_ids.clone()
        return ffn

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.dtype

    @property
    def down(self) -> torch.Tensor:  # [d, k], a de-quantized copy
        return self._down_rows(self.n_loaded, self.dtype).t()

    def _blocks(self, j: int) -> torch.Tensor:
        return neuron_scale_groups(self.neuron_ids[:j], self.down_format)

    def _down_rows(self, j: int, dtype: torch.dtype) -> torch.Tensor:
        """The first j loaded neurons' down columns, de-quantized: [j, d]."""
        return dequantize_columns(self.down_t[:j], self.down_table, self.neuron_ids[:j], self.down_format, dtype)

    def end_prompt(self) -> None:
        super().end_prompt()
        if not decode_kernels(self.gate_up_format, self.down_format):
            self.decode_record = None  # the eager path runs formats without kernels

    def _prefix_record(self) -> FfnWeights:
        m = self.n_active
        gate_up = self.gate_up[:m].view(2 * m, -1)  # [2m, bytes] compact rows, interleaved
        return FfnWeights(FfnKind.ROWS, gate_up, self.down_t[:m], gate_up, down_table=self.down_table,
                          down_block=self._blocks(m))

    def _gate_up_rows(self, active: torch.Tensor) -> torch.Tensor:
        return dequantize(super()._gate_up_rows(active), self.gate_up_format, self.dim, self.dtype)

    def _inactive_output(self, x: torch.Tensor) -> torch.Tensor:
        m = self.n_active
        a = compact_gated_activations(x, self.gate_up[m:], self.gate_up_format, self.act)  # [B, T, k - m]
        return column_linear(a, self.down_t[m:], self.down_table, self.neuron_ids[m:], self.down_format)

    def _activations(self, x: torch.Tensor, m: int) -> torch.Tensor:
        return compact_gated_activations(x, self.gate_up[:m], self.gate_up_format, self.act)

    def _down_of(self, a: torch.Tensor) -> torch.Tensor:  # [B, T, j] @ the first j columns -> [B, T, D]
        j = a.shape[-1]
        return column_linear(a, self.down_t[:j], self.down_table, self.neuron_ids[:j], self.down_format)

    def _reorder(self, order: torch.Tensor) -> None:
        # One gathered matrix at a time (gate, up, down): the transient is a third of the layer's, not all of it.
        # index_select copies whole rows: advanced indexing (gate_up[order, j]) copied byte by byte, 4x slower,
        # a sixth of a 64-token prompt on the 1.5B model (docs/benchmarks.md).
        for j in range(self.gate_up.shape[1]):
            self.gate_up[:, j].copy_(torch.index_select(self.gate_up[:, j], 0, order))
        self.down_t.copy_(torch.index_select(self.down_t, 0, order))

    def decode_bytes(self) -> int:
        table = self.down_table.numel() * self.down_table.element_size()
        return self.n_active * (self.gate_up.shape[1] * self.gate_up.shape[2] + self.down_t.shape[1]) + table


def is_sparse(module: nn.Module) -> bool:
    """A sparse FFN variant: SparseFFN (per-sentence methods) or TokenwiseFFN; not a dense layer."""
    return isinstance(module, (SparseFFN, TokenwiseFFN))


def sparse_modules(model: Transformer) -> list[nn.Module]:
    return [block.mlp for block in model.layers if is_sparse(block.mlp)]


def sparsity_summary(model: Transformer) -> dict:
    """Fractions of all FFN neurons (every layer, dense ones included) that are loaded and computed at decode."""
    n, L = model.cfg.ffn_dim, model.cfg.n_layers
    loaded = computed = 0.0
    for block in model.layers:
        if is_sparse(block.mlp):
            loaded += block.mlp.n_loaded
            computed += block.mlp.n_active
        else:
            loaded += n
            computed += n
    sparse = sparse_modules(model)
    return {
        "sparse_layers": len(sparse),
        "loaded_fraction": loaded / (n * L),
        "computed_fraction": computed / (n * L),
        "sparse_layer_computed_fraction": (
            sum(m.n_active for m in sparse) / (n * len(sparse)) if sparse else 1.0
        ),
    }
