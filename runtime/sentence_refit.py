"""The per-sentence refit (`--refit-tokens N`): a map, fitted at the end of each prompt, for what the
loaded neurons a sentence does not compute would have added.

An offline compensation (`partinfer compensate`) can only stand in for the unloaded neurons: which of
the loaded ones a sentence leaves out is known only after its prompt. At prefill every loaded neuron
is computed, so for the prompt's tokens both the FFN inputs X [t, d] and what the left-out neurons add,
U [t, d], are known. A ridge regression from one to the other in kernel form,

    A = (X Xᵀ + λ I)⁻¹ U        [t, d],   λ = RIDGE · mean(diag X Xᵀ),

adds (x Xᵀ) A at each decode token x: 2·t·d multiply-adds per layer, in the same low-rank slot as the
offline compensation (`comp_in` = X, `comp_out` = Aᵀ). Kernel form because t (tens of tokens) is far
below d; the relative ridge keeps the t × t solve well conditioned whatever the inputs' scale (its
value, 1.0, is the emulation's choice: docs/results.md).
"""

from __future__ import annotations

import torch

RIDGE = 1.0  # λ as a multiple of the mean squared input norm


class PromptInputs:
    """The last `capacity` prompt tokens' FFN inputs of one sequence, gathered chunk by chunk during a
    prefill into one buffer made when the prompt begins (a tensor made mid-prefill fragments the heap
    that the prefill's transients reuse)."""

    def __init__(self, capacity: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buffer = torch.zeros(capacity, dim, dtype=dtype, device=device)  # [capacity, D]
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """x [t, D]: the next tokens of the prompt."""
        n = self.buffer.shape[0]
        x = x[-n:]
        t = x.shape[0]
        if t < n:
            self.buffer[: n - t] = self.buffer[t:].clone()  # the older tokens move up; the oldest fall out
        self.buffer[n - t :] = x
        self.count = min(n, self.count + t)

    def tokens(self) -> torch.Tensor:
        """[count, D]: the kept inputs, oldest first."""
        return self.buffer[self.buffer.shape[0] - self.count :]


def fit_sentence_map(inputs: torch.Tensor, left_out: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs X [t, D], left_out U [t, D] (what the neurons not computed add for those tokens) ->
    (X [t, D], Aᵀ [D, t]) in `dtype`, so that linear(linear(x, X), Aᵀ) = (x Xᵀ) A. Solved in fp64."""
    x = inputs.double()
    gram = x @ x.t()  # [t, t]
    ridge = RIDGE * gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    a = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), left_out.double())
    return inputs.to(dtype).contiguous(), a.t().to(dtype).contiguous()
