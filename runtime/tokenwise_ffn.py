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
out one that matters. It costs one reduction at prefill and nothing per token. Measured on the
default model (γ 0.7, δ 0.3, φ 0.4; `partinfer perplexity -n 96 --methods tokenwise
[--token-score gate]`): continuation perplexity 44.40 ("gate") → 42.30 (load-only: 34.25).

Prefill computes every loaded neuron (it is also where the scale is measured). Measured against the
alternative, the same per-token rule in prefill too (gate ranking there, as no scale exists yet):
continuation perplexity 37.72 → 39.06 (`-n 32`); and a prompt's per-token choices save FLOPs only
with per-token gathers that a batched matmul does not do, so prefill keeps all loaded neurons.

Layout: `gate`, `up` and `down_t` (= W_down[:, loaded]^T) are all neuron-major [k, d], so a token's
neurons are row gathers (`F.embedding`, measured far faster than index_select on bf16 here). Prefill
computes every loaded neuron, as partinfer does; decode of one token reads the base neurons (the
contiguous prefix 0..n_base-1) in place and gathers only the other chosen rows — or, with the
compiled CPU kernels (runtime/native.py), reads every chosen row in place with no gather at all;
several tokens or sequences at once take an equivalent masked path (same selection, same sums).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.kernels import linear, uses_native_gemv
from runtime.model import ACTIVATIONS, FFN_TOKENWISE, FfnSpec, ModelConfig
from runtime.native import gemv, gemv_t
from runtime.selection import real_token_weights
from runtime.sparsity import LayerPlan


class TokenwiseFFN(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: LayerPlan, token_score: str = "scaled"):
        super().__init__()
        k, d = plan.loaded.shape[0], cfg.dim
        self.gate = nn.Parameter(torch.empty(k, d))
        self.up = nn.Parameter(torch.empty(k, d))
        self.down_t = nn.Parameter(torch.empty(k, d))
        self.register_buffer("neuron_ids", plan.loaded.clone().to("cpu"), persistent=False)  # [k] original ids
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.n_base, self.n_active = plan.n_base, plan.n_active
        self.phase = "prefill"
        self.token_score = token_score
        self.token_mask: torch.Tensor | None = None  # [B, T] real tokens of the prompt being prefilled
        self.up_abs_sums: torch.Tensor | None = None  # [B, k] sum of |up_i| over the prompt's real tokens
        self.up_counts: torch.Tensor | None = None  # [B, 1] real tokens summed
        self.score_scale: torch.Tensor | None = None  # [B, k] fp32 s_i per sequence ("scaled"), set at end_prompt
        self.last_selected: torch.Tensor | None = None  # [B, T, m] positions computed by the last decode call
        self.decode_spec: FfnSpec | None = None  # kept by fused_decode_weights, with the scale it was made from
        self.decode_spec_scale: torch.Tensor | None = None

    @property
    def n_loaded(self) -> int:
        return self.gate.shape[0]

    @property
    def down(self) -> torch.Tensor:  # [d, k] view
        return self.down_t.t()

    def begin_prompt(self, token_mask: torch.Tensor | None) -> None:
        self.phase, self.token_mask = "prefill", token_mask
        self.up_abs_sums = self.up_counts = None

    def end_prompt(self) -> None:
        """Turn the prompt's |up| sums into this sentence's score scale s_i = mean |up_i| · ‖down_i‖."""
        if self.token_score == "scaled" and self.up_abs_sums is not None:
            down_norm = self.down_t.float().norm(dim=1)  # [k]
            self.score_scale = self.up_abs_sums / self.up_counts.clamp(min=1) * down_norm  # [B, k]
        self.phase, self.token_mask = "decode", None
        self.up_abs_sums = self.up_counts = None

    def _record_up(self, up: torch.Tensor) -> None:
        """Add |up| of the prompt's real tokens to the per-sequence sums. up [B, T, k]."""
        T = up.shape[1]
        absval, count = up.float().abs(), torch.full((up.shape[0], 1), float(T), device=up.device)
        real = real_token_weights(self.token_mask, T, up.device)  # [B, T, 1] or None
        if real is not None:
            absval, count = absval * real, real.sum(1)
        sums = absval.sum(1)
        self.up_abs_sums = sums if self.up_abs_sums is None else self.up_abs_sums + sums
        self.up_counts = count if self.up_counts is None else self.up_counts + count

    def active_neuron_ids(self) -> torch.Tensor:
        """[B*T, m] original ids computed for each token of the last decode call (base first)."""
        if self.last_selected is None:
            return self.neuron_ids[: self.n_active][None]
        return self.neuron_ids.to(self.last_selected.device)[self.last_selected.flatten(0, 1)]

    def decode_bytes(self) -> int:
        """Weight bytes one decode token reads: all loaded gate rows, φ of up rows and down columns."""
        d, size = self.gate.shape[1], self.gate.element_size()
        return (self.n_loaded + 2 * self.n_active) * d * size

    def select(self, act_gate: torch.Tensor) -> torch.Tensor:
        """act_gate [B, T, k] -> positions [B, T, m]: the base, then the highest scores of the rest
        (|act(gate)|, times the sentence's s_i with token_score "scaled")."""
        B, T, _ = act_gate.shape
        score = act_gate[..., self.n_base :].abs()
        if self.score_scale is not None:
            score = score * self.score_scale[:, None, self.n_base :].to(score.device)  # [B, 1, k - n_base]
        top = torch.topk(score, self.n_active - self.n_base, dim=-1).indices + self.n_base
        base = torch.arange(self.n_base, device=act_gate.device).expand(B, T, self.n_base)
        return torch.cat([base, top], dim=-1)

    def fused_decode_weights(self) -> FfnSpec | None:
        """This layer for the compiled one-token model, which applies the same rule in C++ (choices are
        not recorded in `last_selected` there); None while prefilling, for non-SiLU models, or with
        per-sequence scales of a batch."""
        if self.phase != "decode" or self.act is not F.silu:
            return None
        if self.score_scale is not None and self.score_scale.shape[0] != 1:
            return None
        spec = self.decode_spec
        # The same spec object while the scale and weights are the same lets the model keep its decode
        # plan (`runtime.model.DecodePlan`); a new prompt's scale is a new tensor.
        if (spec is None or self.decode_spec_scale is not self.score_scale or spec[1] is not self.gate
                or spec[2] is not self.down_t or spec[3] is not self.up):
            scale = None if self.score_scale is None else self.score_scale[0].contiguous()  # [k] fp32
            spec = self.decode_spec = (FFN_TOKENWISE, self.gate, self.down_t, self.up, self.n_base, self.n_active, scale)
            self.decode_spec_scale = self.score_scale
        return spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        B, T, _ = x.shape
        if self.phase == "decode" and B == 1 and T == 1 and uses_native_gemv(x, self.gate):
            return self._decode_native(x)
        act_gate = self.act(linear(x, self.gate))  # [B, T, k]
        if self.phase == "prefill":
            up = linear(x, self.up)  # [B, T, k]
            if self.token_score == "scaled":
                self._record_up(up)
            return linear(act_gate * up, self.down)
        selected = self.select(act_gate)  # [B, T, m]
        self.last_selected = selected
        if B == 1 and T == 1:
            # Base neurons are the contiguous prefix 0..n_base-1: read in place; only the rest is gathered.
            nb, xv, ag = self.n_base, x[0, 0][None], act_gate[0, 0]
            rows = selected[0, 0, nb:]
            a_base = ag[:nb] * linear(xv, self.up[:nb])[0]  # [n_base]
            a_rest = ag[rows] * linear(xv, F.embedding(rows, self.up))[0]  # [m - n_base]
            y = torch.mv(self.down_t[:nb].t(), a_base) + torch.mv(F.embedding(rows, self.down_t).t(), a_rest)
            return y.view(1, 1, -1)
        mask = torch.zeros_like(act_gate).scatter_(-1, selected, 1.0)
        return linear(act_gate * mask * linear(x, self.up), self.down)

    def _decode_native(self, x: torch.Tensor) -> torch.Tensor:
        """One token with the compiled kernels: the chosen rows of `up` and `down_t` are read in place."""
        xv = x.reshape(-1).float()  # [D]
        act_gate = self.act(gemv(self.gate, xv))  # [k] fp32
        selected = self.select(act_gate[None, None])  # [1, 1, m]
        self.last_selected = selected
        rows = selected[0, 0]
        a = act_gate[rows] * gemv(self.up, xv, rows)  # [m]
        return gemv_t(self.down_t, a, rows).to(x.dtype).view(1, 1, -1)
