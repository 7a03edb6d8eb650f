"""`SparseFFN`: an FFN layer that holds only its loaded neurons and computes only the active ones at decode.

Life of a sentence (driven by `begin_prompt` / `end_prompt`, which `generate()` calls around prefill):
  prefill  every loaded neuron is computed; for methods that select per sentence, each sequence's
           token-wise core neurons are counted (padding excluded);
  select   per sequence, active = base ∪ ε (`selection.sentence_active`), and the active neurons'
           weights are gathered once into contiguous compact matrices;
  decode   only the compact matrices are read: φ of the FFN bytes per token.
A new prompt (a chat turn) calls `begin_prompt` again and re-selects; the KV cache is untouched.

Weights keep the layout of `F.linear` ([out, in]): `gate`, `up` [k, d] and `down` [d, k]. Measured on
the 2-core AVX2 CPU, a bf16 GEMV with the transposed layout (x @ W, W [in, out]) runs at 0.4-2.3 GB/s
against 15-18 GB/s for F.linear, so no hot-path matmul here reads a transposed weight. Gathering the
active set is a row gather of gate/up and a column gather of down, done once per sentence.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.kernels import linear
from runtime.model import ACTIVATIONS, ModelConfig, Transformer
from runtime.selection import core_score, sentence_active
from runtime.sparsity import LayerPlan, SparsityConfig

SELECTING_METHODS = ("coreinfer", "partinfer")


class SparseFFN(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: LayerPlan, sparsity: SparsityConfig):
        super().__init__()
        k, d = plan.loaded.shape[0], cfg.dim
        self.gate = nn.Parameter(torch.empty(k, d))
        self.up = nn.Parameter(torch.empty(k, d))
        self.down = nn.Parameter(torch.empty(d, k))
        self.register_buffer("neuron_ids", plan.loaded.clone().to("cpu"), persistent=False)  # [k] original ids
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.method = sparsity.method
        self.n_base, self.n_active = plan.n_base, plan.n_active
        self.n_core = max(1, min(k, round(sparsity.token_sparsity * cfg.ffn_dim)))  # a token's core neurons
        self.core_score = sparsity.core_score
        self.selects = sparsity.method in SELECTING_METHODS
        self.phase = "prefill"
        self.token_mask: torch.Tensor | None = None  # [B, T] real tokens of the prompt being prefilled
        self.core_counts: torch.Tensor | None = None  # [B, k]
        self.abs_sums: torch.Tensor | None = None  # [B, k]
        self.active: torch.Tensor | None = None  # [B, m] positions into the loaded set
        self.c_gate_up: torch.Tensor | None = None  # [B, 2m, d]
        self.c_down: torch.Tensor | None = None  # [B, d, m]

    @property
    def n_loaded(self) -> int:
        return self.gate.shape[0]

    def begin_prompt(self, token_mask: torch.Tensor | None) -> None:
        self.phase, self.token_mask = "prefill", token_mask
        self.core_counts = self.abs_sums = None

    def end_prompt(self) -> None:
        """Choose the active set (per sequence) and gather the compact decode weights."""
        if self.selects and self.core_counts is not None:
            # abs_sums orders ties like mean |a| does: the token count is the same for every neuron of a sequence.
            self.set_active(sentence_active(self.core_counts, self.abs_sums, self.n_base, self.n_active))
        elif self.method == "static" and self.active is None:
            self.set_active(torch.arange(self.n_active, device=self.gate.device)[None])
        self.phase, self.token_mask = "decode", None
        self.core_counts = self.abs_sums = None

    def set_active(self, active: torch.Tensor) -> None:
        """active [B, m] positions into the loaded set -> contiguous compact weights per sequence."""
        self.active = active
        self.c_gate_up = torch.cat([self.gate[active], self.up[active]], dim=1)  # [B, 2m, d]
        self.c_down = torch.stack([self.down[:, a] for a in active])  # [B, d, m]

    def active_neuron_ids(self) -> torch.Tensor:
        """[B, m] original neuron indices computed at decode (all loaded when no selection applies)."""
        if self.active is None:
            return self.neuron_ids[None]
        return self.neuron_ids.to(self.active.device)[self.active]

    def _record(self, a: torch.Tensor) -> None:
        """Count each sequence's token-wise core neurons over real prompt tokens. a [B, T, k]."""
        B, T, k = a.shape
        score = core_score(a.float(), self.core_score)
        top = torch.topk(score, self.n_core, dim=-1).indices
        core = torch.zeros(B, T, k, dtype=torch.float32, device=a.device).scatter_(-1, top, 1.0)
        absval = a.float().abs()
        if self.token_mask is not None:
            real = self.token_mask[:, -T:, None].to(a.device, torch.float32)
            core, absval = core * real, absval * real
        counts, sums = core.sum(1), absval.sum(1)
        self.core_counts = counts if self.core_counts is None else self.core_counts + counts
        self.abs_sums = sums if self.abs_sums is None else self.abs_sums + sums

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        if self.phase == "decode" and self.c_gate_up is not None:
            if self.c_gate_up.shape[0] == 1:  # one active set for the whole batch (B = 1, or static)
                g, u = linear(x, self.c_gate_up[0]).chunk(2, dim=-1)  # [B, T, m] each
                return linear(self.act(g) * u, self.c_down[0])  # [B, T, D]
            g, u = torch.bmm(x, self.c_gate_up.transpose(1, 2)).chunk(2, dim=-1)  # per sequence: [B, T, m]
            return torch.bmm(self.act(g) * u, self.c_down.transpose(1, 2))  # [B, T, D]
        a = self.act(linear(x, self.gate)) * linear(x, self.up)  # [B, T, k]
        if self.phase == "prefill" and self.selects:
            self._record(a)
        return linear(a, self.down)


def sparse_modules(model: Transformer) -> list[SparseFFN]:
    return [block.mlp for block in model.layers if isinstance(block.mlp, SparseFFN)]


def begin_prompt(model: Transformer, token_mask: torch.Tensor | None = None) -> None:
    """Before prefilling a new sentence: compute all loaded neurons and record selection statistics."""
    for m in sparse_modules(model):
        m.begin_prompt(token_mask)


def end_prompt(model: Transformer) -> None:
    """After the prefill: select each sequence's active neurons and switch to compact decode."""
    for m in sparse_modules(model):
        m.end_prompt()


def sparsity_summary(model: Transformer) -> dict:
    """Fractions of all FFN neurons (every layer, dense ones included) that are loaded and computed at decode."""
    n, L = model.cfg.ffn_dim, model.cfg.n_layers
    loaded = computed = 0.0
    for block in model.layers:
        if isinstance(block.mlp, SparseFFN):
            loaded += block.mlp.n_loaded
            computed += block.mlp.n_loaded if block.mlp.active is None else block.mlp.active.shape[1]
        else:
            loaded += n
            computed += n
    sparse = sparse_modules(model)
    return {
        "sparse_layers": len(sparse),
        "loaded_fraction": loaded / (n * L),
        "computed_fraction": computed / (n * L),
        "sparse_layer_computed_fraction": (
            sum(m.n_loaded if m.active is None else m.active.shape[1] for m in sparse) / (n * len(sparse)) if sparse else 1.0
        ),
    }
