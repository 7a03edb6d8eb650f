"""What to load and what to compute: `SparsityConfig` and the per-layer plan derived from neuron files.

Fractions are of n = neurons per FFN layer, for sparse layers `start_num..end_num` (inclusive):
  γ (gamma) loaded from disk, δ (delta) base neurons always computed, φ (phi) computed per sentence.
Constraint 0 < δ <= φ <= γ <= 1. Methods (docs/design.md, §1):
  dense      everything loaded and computed
  load-only  γ loaded, all loaded computed
  static     γ loaded, the first φ·n of the loaded order computed at decode, same for every sentence
  coreinfer  everything loaded, φ·n chosen per sentence among all neurons (no base)
  partinfer  γ loaded, δ base + ε chosen per sentence among loaded ∖ base
  tokenwise  γ loaded, δ base + the highest |act(gate)| (× a per-sentence scale) of the loaded, per token (ours)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from partinfer.common.errors import PartinferError
from partinfer.common.neuron_file import NeuronFile
from partinfer.runtime.config import ModelConfig
from partinfer.runtime.selection import CORE_SCORES, ids_sorted_within, loaded_order

METHODS = ("dense", "load-only", "static", "coreinfer", "partinfer", "tokenwise")
# How `tokenwise` ranks a token's neurons beyond the base: "gate" = |act(gate_i)|; "scaled" = |act(gate_i)|
# times the sentence's mean |up_i| (measured in its prefill) times ‖down_i‖, the gate's estimate of the
# neuron's contribution |act(gate_i) · up_i| · ‖down_i‖ at no extra bytes per token.
TOKEN_SCORES = ("scaled", "gate")
# "uniform": every sparse layer loads γ·n and computes φ·n. "profiled": the same total neurons, spread
# by layer by each layer's measured sensitivity, stored in the base neuron file (`layer_budgets`).
BUDGETS = ("uniform", "profiled")
# How far `--budget profiled` moves from uniform toward the allocation its linear error model calls
# optimal: 1 trusts the model fully; halfway measured better (docs/results.md), because the model
# overrates what the first neurons given to a sensitive layer buy back.
BUDGET_DAMPING = 0.5


def default_layer_range(n_layers: int) -> tuple[int, int]:
    """PartInfer keeps the first and last few layers dense (3..25 of 28); scale that with depth."""
    edge = max(1, round(0.1 * n_layers))
    return min(edge, n_layers - 1), max(n_layers - 1 - edge, min(edge, n_layers - 1))


@dataclass(frozen=True)
class SparsityConfig:
    # the default method is the one the quality/memory chart picks for chat (docs/design.md §9): at the
    # same γ and φ, tokenwise loses far less than partinfer's once-per-sentence choice
    method: str = "tokenwise"
    gamma: float = 0.7  # loaded fraction
    delta: float = 0.3  # base fraction
    phi: float = 0.4  # computed fraction (sparsity)
    token_sparsity: float = 0.2  # α: a token's core neurons
    core_score: str = "abs"
    token_score: str = "scaled"  # tokenwise only, see TOKEN_SCORES
    start_num: int | None = None  # first sparse layer; None = scaled default
    end_num: int | None = None  # last sparse layer (inclusive)
    base_neurons_type: str = "model"  # which neuron file ranks the base neurons
    model_neurons: Path | None = None
    dataset_neurons: Path | None = None
    compensation: Path | None = None  # a compensation file for the unloaded neurons (`partinfer compensate`)
    budget: str = "uniform"  # how γ and φ are spread over the sparse layers, see BUDGETS
    refit_tokens: int = 0  # per-sentence refit of what is loaded but not computed, from this many prompt tokens; 0: off

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PartinferError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0 < self.gamma <= 1:
            raise PartinferError(f"--gamma (loaded fraction) must be in (0, 1], got {self.gamma}")
        if not 0 < self.phi <= 1:
            raise PartinferError(f"--phi (sparsity, computed fraction) must be in (0, 1], got {self.phi}")
        if not 0 < self.delta <= 1:
            raise PartinferError(f"--delta (base fraction) must be in (0, 1], got {self.delta}")
        if self.method in ("partinfer", "tokenwise") and self.delta > self.phi:
            raise PartinferError(f"--delta {self.delta} > --phi {self.phi}: base neurons must fit in the computed set; lower --delta or raise --phi")
        if self.method in ("partinfer", "tokenwise", "load-only", "static") and self.delta > self.gamma:
            raise PartinferError(f"--delta {self.delta} > --gamma {self.gamma}: base neurons must be loaded; lower --delta or raise --gamma")
        if self.method in ("partinfer", "tokenwise", "static") and self.phi > self.gamma:
            raise PartinferError(f"--phi {self.phi} > --gamma {self.gamma}: cannot compute more neurons than are loaded; raise --gamma or lower --phi")
        if not 0 < self.token_sparsity <= 1:
            raise PartinferError(f"--token-sparsity must be in (0, 1], got {self.token_sparsity}")
        if self.core_score not in CORE_SCORES:
            raise PartinferError(f"--core-score must be one of {', '.join(CORE_SCORES)}")
        if self.token_score not in TOKEN_SCORES:
            raise PartinferError(f"--token-score must be one of {', '.join(TOKEN_SCORES)}, got {self.token_score!r}")
        if self.base_neurons_type not in ("model", "dataset"):
            raise PartinferError("--base-neurons-type must be model or dataset")
        if self.budget not in BUDGETS:
            raise PartinferError(f"--budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if self.refit_tokens < 0:
            raise PartinferError(f"--refit-tokens must be 0 (off) or a number of prompt tokens, got {self.refit_tokens}")
        if self.refit_tokens and self.method == "tokenwise":
            raise PartinferError("--refit-tokens fits one map per sentence: it is for static, coreinfer and partinfer, "
                                 "not tokenwise (whose computed set changes per token); leave it 0")
        if self.base_neurons_type == "dataset" and self.method != "dense" and self.dataset_neurons is None:
            raise PartinferError("--base-neurons-type dataset needs --dataset-neurons FILE")

    def to_dict(self) -> dict[str, object]:
        """JSON-able field values (paths as strings): what crosses into a worker process or lm-eval."""
        return {f.name: str(v) if isinstance(v, Path) else v for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> "SparsityConfig":
        """The inverse of `to_dict`, also for string values (lm-eval's `model_args`): each converted to its
        field's type, "" and "None" meaning None; unknown keys are a one-line error."""
        kinds = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            raise PartinferError(f"unknown sparsity setting {unknown[0]!r}; known: {', '.join(kinds)}")
        converted = {}
        for name, value in values.items():
            kind = kinds[name]
            try:
                if value in (None, "", "None"):
                    converted[name] = None
                elif "float" in kind:
                    converted[name] = float(value)
                elif "int" in kind:
                    converted[name] = int(value)
                elif "Path" in kind:
                    converted[name] = Path(value)
                else:
                    converted[name] = str(value)
            except (TypeError, ValueError) as e:
                raise PartinferError(f"sparsity setting {name}={value!r} is not a {kind}") from e
        return cls(**converted)

    @property
    def loaded_fraction(self) -> float:
        return 1.0 if self.method in ("dense", "coreinfer") else self.gamma

    def layer_range(self, n_layers: int) -> tuple[int, int]:
        start, end = default_layer_range(n_layers)
        start = start if self.start_num is None else self.start_num
        end = end if self.end_num is None else self.end_num
        if not 0 <= start <= end < n_layers:
            raise PartinferError(
                f"sparse layers --start-num {start} .. --end-num {end} must satisfy 0 <= start <= end < {n_layers} (layers of this model)"
            )
        return start, end

    def sparse_layers(self, n_layers: int) -> list[int]:
        if self.method == "dense":
            return []
        start, end = self.layer_range(n_layers)
        return list(range(start, end + 1))


@dataclass(frozen=True)
class LayerPlan:
    """One sparse layer: which neurons are loaded (in order: base first) and how many are computed."""

    loaded: torch.Tensor  # int64 [k] original neuron indices, base neurons first
    n_base: int  # the first n_base of `loaded` are always computed
    n_active: int  # neurons computed at decode (round(φ·n)); == k for load-only


def loaded_digest(plans: dict[int, LayerPlan], n: int) -> str:
    """Names the loaded neuron sets of all sparse layers (order-free): what a compensation was fit for."""
    digest = hashlib.sha256(str(n).encode())
    for i in sorted(plans):
        digest.update(f"{i}:".encode())
        digest.update(torch.sort(plans[i].loaded).values.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


def fraction_count(fraction: float, n: int) -> int:
    return max(1, min(n, round(fraction * n)))


@dataclass(frozen=True)
class NeuronFiles:
    """The neuron files a configuration names, each read once (and checked against the model)."""

    model: NeuronFile | None = None
    dataset: NeuronFile | None = None

    @classmethod
    def read(cls, sparsity: SparsityConfig, cfg: ModelConfig) -> "NeuronFiles":
        def load(path: Path | None) -> NeuronFile | None:
            return None if path is None else NeuronFile.load(path, cfg.fingerprint)

        return cls(load(sparsity.model_neurons), load(sparsity.dataset_neurons))


def plan_layers(sparsity: SparsityConfig, cfg: ModelConfig, files: NeuronFiles | None = None) -> dict[int, LayerPlan]:
    """Decide, per sparse layer, the loaded set and counts from the neuron files (docs/design.md, §1
    "Online"); `files`: those `sparsity` names, when read already (else they are read here)."""
    layers = sparsity.sparse_layers(cfg.n_layers)
    if not layers:
        return {}
    n = cfg.ffn_dim
    files = files if files is not None else NeuronFiles.read(sparsity, cfg)
    model_nf, dataset_nf = files.model, files.dataset
    if sparsity.method == "coreinfer":
        return {i: LayerPlan(torch.arange(n), 0, fraction_count(sparsity.phi, n)) for i in layers}
    if model_nf is None and dataset_nf is None:
        if sparsity.method == "load-only" and sparsity.gamma == 1:
            return {i: LayerPlan(torch.arange(n), 0, n) for i in layers}
        raise PartinferError(
            f"--method {sparsity.method} needs a neuron file: pass --model-neurons FILE "
            "(see neuron_files/ or make one with `partinfer profile`)"
        )
    base_nf, other_nf = (model_nf, dataset_nf) if sparsity.base_neurons_type == "model" else (dataset_nf, model_nf)
    other_nf = other_nf or base_nf
    k = fraction_count(sparsity.gamma, n)
    # The loaded set is the same for load-only, static and partinfer (base first, then the other ranking),
    # so load-only is the ceiling of the others; partinfer and tokenwise treat the base as always computed.
    n_base = min(fraction_count(sparsity.delta, n), k)
    n_active = fraction_count(sparsity.phi, n)
    budgets = {i: k for i in layers}
    if sparsity.budget == "profiled":
        base_path = sparsity.model_neurons if sparsity.base_neurons_type == "model" else sparsity.dataset_neurons
        kl = measured_sensitivity(base_nf, base_path, sparsity.gamma, layers)
        budgets = layer_budgets([base_nf.mean_abs(i) for i in layers], kl, k, n_base)
        budgets = dict(zip(layers, budgets))
    plans = {}
    for i in layers:
        k_i = budgets[i]
        loaded = loaded_order(base_nf.rank(i).long(), other_nf.rank(i).long(), n_base, k_i)
        # the computed neurons above the base follow the layer's loaded ones above the base: the same
        # computed total as uniform, to within a neuron per layer
        above = round((n_active - n_base) * (k_i - n_base) / (k - n_base)) if k > n_base else 0
        active = k_i if sparsity.method == "load-only" else max(1, min(k_i, n_base + above))
        plans[i] = LayerPlan(ids_sorted_within(loaded, (n_base, active)),
                             n_base if sparsity.method in ("partinfer", "tokenwise") else 0, active)
    return plans


def measured_sensitivity(neurons: NeuronFile, path: Path | None, gamma: float, layers: list[int]) -> list[float]:
    """The base neuron file's per-layer sensitivities for `layers`, measured at this γ; a one-line error
    naming the command that measures them when the file has none, or has them for another γ."""
    measure = f"partinfer neurons sensitivity {path} --gamma {gamma} --out NEW_FILE"
    sens = neurons.sensitivity
    if sens is None:
        raise PartinferError(f"--budget profiled needs layer sensitivities, and {path} has none; measure them: {measure}")
    if abs(sens.gamma - gamma) > 1e-9:
        raise PartinferError(f"{path} has layer sensitivities for --gamma {sens.gamma}, not {gamma}; measure them for "
                             f"this γ: {measure}")
    missing = [i for i in layers if i not in sens.kl]
    if missing:
        raise PartinferError(f"{path} has no sensitivity for layer {missing[0]}; measure every layer: {measure}")
    return [sens.kl[i] for i in layers]


def layer_budgets(mean_abs: list[torch.Tensor], kl: list[float], k: int, n_base: int) -> list[int]:
    """Loaded neurons per layer for `--budget profiled`, with the uniform total (len(mean_abs) × k) and
    each layer keeping at least its n_base base neurons.

    Error model: a layer's loss grows linearly with the share of its activation mass (mean |a|) left
    unloaded, scaled so that at k loaded neurons it is the layer's measured sensitivity `kl`. Under it
    the best split gives neurons one at a time to the layer where the next one (by its ranking) removes
    the most loss; the shares are concave in each layer, so a global top-k of the gains is that greedy
    choice. The result moves BUDGET_DAMPING of the way from uniform to that split."""
    gains = []
    for m, sensitivity in zip(mean_abs, kl):
        share = torch.sort(m.double(), descending=True).values
        share = share / share.sum().clamp(min=1e-30)
        unloaded = share[k:].sum().clamp(min=1e-30)  # the share whose loss `sensitivity` measured
        gains.append(sensitivity * share[n_base:] / unloaded)
    position_major = torch.stack(gains, dim=1).flatten()  # [position, layer]
    extra = len(mean_abs) * (k - n_base)
    # a stable descending sort: equal gains go to the earlier position, then the lower layer, so equal
    # layers split evenly and the choice is deterministic
    chosen = torch.sort(position_major, descending=True, stable=True).indices[:extra]
    optimal = torch.bincount(chosen % len(mean_abs), minlength=len(mean_abs)).double() + n_base
    target = k + BUDGET_DAMPING * (optimal - k)
    counts = target.floor().long()
    # hand the neurons rounding left over to the largest remainders (then the lower layer): the same total
    leftover = len(mean_abs) * k - int(counts.sum())
    counts[torch.sort(target - counts, descending=True, stable=True).indices[:leftover]] += 1
    return [int(c) for c in counts]
