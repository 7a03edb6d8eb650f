"""`TokenwiseFFN` (`--method tokenwise`): a per-token choice of the computed neurons, by the gate.

Per-sentence selection (PartInfer, CoreInfer) fixes φ of the neurons for a whole answer; on SiLU
models that costs most of the accuracy that loading γ keeps (docs/design.md, "Why |a|").
Here every token, in every sparse layer, computes the gate projection of all loaded neurons, keeps
the δ·n base neurons plus the loaded neurons with the highest gate-based score (below) up to φ·n,
and computes `up` and `down` only for those. Bytes read per token: (γ/3 + 2φ/3) of the layer's FFN.

Ranking (`token_score`): "gate" ranks by |act(gate_i)| alone, as the method was first specified;
"scaled" (the default) multiplies it by a per-sentence constant s_i = mean |up_i| over the
sentence's prefill tokens × ‖down_i‖, so the score estimates the neuron's real contribution
|act(gate_i)·up_i|·‖down_i‖ — a neuron with a large gate but small `up` and `down` no longer crowds
out one that matters. It costs one reduction at prefill and nothing per token.

Prefill computes every loaded neuron (it is also where the scale is measured): the same per-token
rule in prefill measured worse, and a prompt's per-token choices save FLOPs only with per-token
gathers that a batched matmul does not do. Both measurements: docs/design.md §7.

Layout: `gate`, `up` and `down_t` (= W_down[:, loaded]^T) are all neuron-major [k, d], so a token's
neurons are row gathers (`F.embedding`, faster than index_select on bf16). Prefill
computes every loaded neuron, as partinfer does; decode of one token reads the base neurons (the
contiguous prefix 0..n_base-1) in place and gathers only the other chosen rows — or, with the
compiled decode (runtime/decode.py), reads every chosen row in place with no gather at all;
several tokens or sequences at once take an equivalent masked path (same selection, same sums).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from partinfer.common.formats.blocks import BlockFormat
from partinfer.runtime.config import ACTIVATIONS, ModelConfig, activate_in_place
from partinfer.runtime.decode_contract import FfnKind, FfnWeights
from partinfer.runtime.ffn import COLUMN_TILE_BYTES, FeedForward, FfnRows, column_linear, decode_kernels
from partinfer.runtime.kernels import gather_rows, linear
from partinfer.runtime.quant import dequantize_columns, down_table_shape, neuron_scale_groups
from partinfer.runtime.selection import add_abs_sums, real_token_weights
from partinfer.runtime.sparsity import LayerPlan, SparsityConfig


class TokenwiseFFN(FeedForward):
    def __init__(self, cfg: ModelConfig, plan: LayerPlan, token_score: str = "scaled",
                 compact: tuple[BlockFormat, BlockFormat] | None = None, dtype: torch.dtype = torch.bfloat16):
        """`compact`: (gate/up format, down format) for compact rows and down columns, de-quantized to
        `dtype` where the eager path computes with them; None: float rows."""
        super().__init__()
        k, d = plan.loaded.shape[0], cfg.dim
        self.dim, self.dtype = d, dtype
        self.gate_up_format, self.down_format = compact or (None, None)
        if compact is None:
            self.gate, self.up, self.down_t = (nn.Parameter(torch.empty(k, d)) for _ in range(3))
            self.register_parameter("down_table", None)
        else:
            gate_up_bytes, down_bytes = compact[0].row_bytes(d), compact[1].column_code_bytes(d)
            self.gate, self.up, self.down_t = (nn.Parameter(torch.empty(k, b, dtype=torch.uint8), requires_grad=False)
                                               for b in (gate_up_bytes, gate_up_bytes, down_bytes))
            self.down_table = nn.Parameter(torch.empty(down_table_shape(compact[1], cfg.ffn_dim, d), dtype=torch.float16),
                                           requires_grad=False)  # [n / block, head_bytes / 2, d]
        self.register_buffer("neuron_ids", plan.loaded.clone().to("cpu"), persistent=False)  # [k] original ids
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.n_base, self.n_active = plan.n_base, plan.n_active
        self.phase = "prefill"
        self.token_score = token_score
        self.up_abs_sums: torch.Tensor | None = None  # [B, k] sum of |up_i| over the prompt's real tokens
        self.up_counts: torch.Tensor | None = None  # [B, 1] real tokens summed
        self.score_scale: torch.Tensor | None = None  # [B, k] fp32 s_i per sequence ("scaled"), set at end_prompt
        self.last_selected: torch.Tensor | None = None  # [B, T, m] positions computed by the last decode call
        self.decode_record: FfnWeights | None = None  # built at end_prompt for the compiled decode
        self.down_norm_cache: torch.Tensor | None = None  # [k] fp32 ‖down_i‖, see down_norms

    @classmethod
    def from_rows(cls, cfg: ModelConfig, plan: LayerPlan, rows: FfnRows, sparsity: SparsityConfig,
                  dtype: torch.dtype) -> "TokenwiseFFN":
        """The layer from its loaded rows (plan order, base first), float or compact alike."""
        compact = (rows.gate_up_format, rows.down_format) if rows.compact else None
        with torch.device("meta"):
            ffn = cls(cfg, plan, sparsity.token_score, compact, dtype)
        own = dict(memory_format=torch.contiguous_format)  # rows arrive as views of one read: own copies
        cast = (lambda t: t.clone(**own)) if rows.compact else (lambda t: t.to(dtype).clone(**own))  # noqa: E731
        ffn.gate, ffn.up, ffn.down_t = (nn.Parameter(cast(t), requires_grad=False) for t in (rows.gate, rows.up, rows.down_t))
        if rows.compact:
            ffn.down_table = nn.Parameter(rows.down_table, requires_grad=False)
        ffn.neuron_ids = rows.neuron_ids.clone()
        return ffn

    @property
    def n_loaded(self) -> int:
        return self.gate.shape[0]

    def _rows_linear(self, x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., D] against gate or up rows w [j, D or row_bytes] (w[rows] when given) -> [..., j or len(rows)];
        K-quant rows chosen by `rows` are read in place by the compiled product (no gathered copy)."""
        return linear(x, w, fmt=self.gate_up_format, rows=rows)

    @property
    def down(self) -> torch.Tensor:  # [d, k] view (a de-quantized copy for compact columns)
        return self._down_rows(slice(None)).t()

    def _down_rows(self, index: slice | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """down_t[index] as floats [j, d]: compact columns de-quantized with their blocks' scales."""
        if self.down_table is None:
            return self.down_t[index]
        return dequantize_columns(self.down_t[index], self.down_table, self.neuron_ids[index], self.down_format,
                                  dtype or self.dtype)

    def down_norms(self) -> torch.Tensor:
        """‖down_i‖ of every loaded neuron [k] fp32: a property of the weights, computed once (by
        `compute_down_norms` at load, or here on first use) and kept (de-quantizing every compact down
        column per sentence cost more than the prompt itself)."""
        if self.down_norm_cache is None:
            compute_down_norms([self])
        return self.down_norm_cache

    def begin_prompt(self, batch: int, device: torch.device) -> None:
        self.phase = "prefill"
        self.up_abs_sums = self.up_counts = None
        if self.token_score == "scaled":
            self.up_abs_sums = torch.zeros(batch, self.n_loaded, device=device)
            self.up_counts = torch.zeros(batch, 1, device=device)

    def end_prompt(self) -> None:
        """Turn the prompt's |up| sums into this sentence's score scale s_i = mean |up_i| · ‖down_i‖."""
        if self.token_score == "scaled" and self.up_abs_sums is not None:
            self.score_scale = self.up_abs_sums / self.up_counts.clamp(min=1) * self.down_norms()  # [B, k]
        self.phase = "decode"
        self.up_abs_sums = self.up_counts = None
        self.decode_record = None
        single = self.score_scale is None or self.score_scale.shape[0] == 1
        if self.act is F.silu and single and decode_kernels(self.gate_up_format, self.down_format):
            scale = None if self.score_scale is None else self.score_scale[0].contiguous()  # [k] fp32
            blocks = None if self.down_table is None else neuron_scale_groups(self.neuron_ids, self.down_format)
            self.decode_record = FfnWeights(FfnKind.TOKENWISE, self.gate, self.down_t, self.up, self.n_base,
                                            self.n_active, scale, self.down_table, blocks)

    def _record_up(self, up: torch.Tensor) -> None:
        """Add |up| of the prompt's real tokens to the per-sequence sums. up [B, T, k]."""
        T = up.shape[1]
        real = real_token_weights(self.token_mask, T, up.device)  # [B, T, 1] or None
        add_abs_sums(self.up_abs_sums, up, real)
        if real is None:
            self.up_counts.add_(T)
        else:
            self.up_counts.add_(real.sum(1))

    def active_neuron_ids(self) -> torch.Tensor:
        """[B*T, m] original ids computed for each token of the last decode call (base first)."""
        if self.last_selected is None:
            return self.neuron_ids[: self.n_active][None]
        return self.neuron_ids.to(self.last_selected.device)[self.last_selected.flatten(0, 1)]

    def decode_bytes(self) -> int:
        """Weight bytes one decode token reads: all loaded gate rows, φ of up rows and down columns
        (and the down columns' block scales)."""
        row = lambda w: w.shape[1] * w.element_size()  # noqa: E731
        table = 0 if self.down_table is None else self.down_table.numel() * self.down_table.element_size()
        return self.n_loaded * row(self.gate) + self.n_active * (row(self.up) + row(self.down_t)) + table

    def select(self, act_gate: torch.Tensor) -> torch.Tensor:
        """act_gate [B, T, k] -> positions [B, T, m]: the base, then the highest scores of the rest
        (|act(gate)|, times the sentence's s_i with token_score "scaled")."""
        B, T, _ = act_gate.shape
        score = act_gate[..., self.n_base :].abs()
        if self.score_scale is not None:
            score = score * self.score_scale[:, None, self.n_base :].to(score.device)  # [B, 1, k - n_base]
        # Ties go to the lower position, as in the compiled decode (runtime/csrc/decode_team.h, `tokenwise_ffn_team`): a
        # stable descending sort, where torch.topk leaves the order of equal scores unspecified.
        top = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., : self.n_active - self.n_base]
        top = top + self.n_base
        base = torch.arange(self.n_base, device=act_gate.device).expand(B, T, self.n_base)
        return torch.cat([base, top], dim=-1)

    def decode_weights(self) -> FfnWeights | None:
        """This layer for the compiled decode, which applies the same rule in C++ (its choices are not
        recorded in `last_selected`); None while prefilling, for non-SiLU models, or with the
        per-sequence scales of a batch."""
        return self.decode_record if self.phase == "decode" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        return self.compensate(x, self._computed(x))

    def _computed(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]: the chosen neurons' output
        B, T, _ = x.shape
        act_gate = activate_in_place(self.act, self._rows_linear(x, self.gate))  # [B, T, k]
        if self.phase == "prefill":
            up = self._rows_linear(x, self.up)  # [B, T, k]
            if self.token_score == "scaled":
                self._record_up(up)
            return self._down_linear(act_gate.mul_(up))  # in place: one [B, T, k] transient fewer
        selected = self.select(act_gate)  # [B, T, m]
        self.last_selected = selected
        if B == 1 and T == 1:
            # Base neurons are the contiguous prefix 0..n_base-1: read in place; only the rest is gathered.
            nb, xv, ag = self.n_base, x[0, 0][None], act_gate[0, 0]
            rows = selected[0, 0, nb:]
            a_base = ag[:nb] * self._rows_linear(xv, self.up[:nb])[0]  # [n_base]
            a_rest = ag[rows] * self._rows_linear(xv, self.up, rows)[0]  # [m - n_base]
            if self.down_table is not None:  # compact columns: summed in place (no de-quantized copy for few tokens)
                y = (column_linear(a_base[None], self.down_t[:nb], self.down_table, self.neuron_ids[:nb], self.down_format)
                     + column_linear(a_rest[None], self.down_t, self.down_table, self.neuron_ids, self.down_format, rows))
                return y.view(1, 1, -1)
            y = torch.mv(self.down_t[:nb].t(), a_base) + torch.mv(gather_rows(self.down_t, rows).t(), a_rest)
            return y.view(1, 1, -1)
        mask = torch.zeros_like(act_gate).scatter_(-1, selected, 1.0)
        return self._down_linear(act_gate * mask * self._rows_linear(x, self.up))

    def _down_linear(self, a: torch.Tensor) -> torch.Tensor:
        """a [B, T, k] over every loaded neuron -> [B, T, D] (compact columns a tile at a time)."""
        if self.down_table is None:
            return linear(a, self.down_t.t())
        return column_linear(a, self.down_t, self.down_table, self.neuron_ids, self.down_format)


def compute_down_norms(layers: list[TokenwiseFFN]) -> None:
    """Each layer's ‖down_i‖ (`TokenwiseFFN.down_norms`), compact columns de-quantized a tile of neurons
    at a time (a whole layer at once was a 38 MB transient on the 1.5B model). Every layer's norms are
    made before the first tile, so that the tiles, all freed, leave one free stretch at the heap's top:
    made between tiles, each small tensor took a bite of a freed tile's space, the next tile no longer
    fitted there: computed on first use, they left 30 MiB of holes in the default model's heap after
    its first generation (7 MiB now), which later prefills touched again. The loader calls this."""
    for layer in layers:
        layer.down_norm_cache = torch.empty(layer.down_t.shape[0], device=layer.down_t.device)  # [k] fp32
    for layer in layers:
        step = max(1, COLUMN_TILE_BYTES // (4 * layer.dim))  # neurons per tile of fp32 columns
        for i in range(0, layer.down_t.shape[0], step):
            torch.linalg.vector_norm(layer._down_rows(slice(i, i + step), torch.float32).float(), dim=1,
                                     out=layer.down_norm_cache[i : i + step])
