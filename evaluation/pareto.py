"""`partinfer pareto`: quality against memory over a grid of methods, budgets and weight formats.

A user picks an operating point from this chart: every configuration's continuation perplexity on
held-out text (the `eval` split, as `partinfer perplexity` scores it) as a ratio to dense bf16,
against the weight bytes the configuration keeps in memory and the weight bytes one decode token
reads. φ and δ follow γ at the paper's proportions (φ = 4/7 γ, δ = 3/7 γ: 0.4 and 0.3 at γ 0.7),
so each method is one curve per weight format. Memory here is the weights the loaded model holds
(`partinfer memory` measures the process around them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from common.output_dir import IncrementalOutput
from evaluation.bench import weight_bytes_per_token
from evaluation.memory import MIB, expected_bytes
from evaluation.perplexity import corpus_perplexity, perplexity_texts
from runtime.engine import parse_device, parse_dtype
from runtime.loader import load_model
from runtime.sparse_ffn import SparseFFN
from runtime.sparsity import SparsityConfig
from runtime.text import load_tokenizer

PHI_SHARE, DELTA_SHARE = 4 / 7, 3 / 7  # φ/γ and δ/γ of the paper's budget (0.4 and 0.3 at γ 0.7)


@dataclass(frozen=True)
class ParetoPoint:
    method: str
    weights: str
    gamma: float
    phi: float
    perplexity: float
    ratio: float  # perplexity ÷ dense bf16's (1.0 = no loss)
    weights_mib: float  # weight bytes the loaded model keeps
    mb_per_token: float  # weight bytes one decode token reads


def grid(methods: tuple[str, ...], gammas: tuple[float, ...], weights: tuple[str, ...],
         base: SparsityConfig) -> list[SparsityConfig]:
    """Dense per weight format, then every method at every γ (φ, δ at the paper's proportions of γ)."""
    configs = []
    for w in weights:
        configs.append(replace(base, method="dense", weights=w))
        for method in methods:
            for g in gammas:
                phi = g if method == "load-only" else round(PHI_SHARE * g, 4)
                configs.append(replace(base, method=method, weights=w, gamma=g, phi=phi,
                                       delta=min(round(DELTA_SHARE * g, 4), phi)))
    return configs


def run_pareto(model_dir: Path, methods: tuple[str, ...], gammas: tuple[float, ...], weights: tuple[str, ...],
               base: SparsityConfig, out: Path, dataset: str = "xsum", num_samples: int = 16, prompt_tokens: int = 64,
               cont_tokens: int = 128, dtype: str = "bf16", device: str = "cpu") -> dict:
    """Score every configuration of the grid and write pareto.json, pareto.md and pareto.png into `out`."""
    if "bf16" not in weights:
        weights = ("bf16", *weights)  # the reference every ratio is taken to
    configs = grid(methods, gammas, weights, base)  # invalid budgets fail here, before any output
    output = IncrementalOutput(out, "pareto", inputs=(model_dir,))
    ids = perplexity_texts(dataset, num_samples, load_tokenizer(model_dir), prompt_tokens + cont_tokens)
    points: list[ParetoPoint] = []
    reference = None
    for config in tqdm(configs, desc="pareto", unit="config"):
        model = load_model(model_dir, parse_dtype(dtype), parse_device(device), config)
        ppl = corpus_perplexity(model, ids, prompt_tokens)
        reference = ppl if reference is None else reference  # dense bf16 comes first
        loaded = config.loaded_fraction
        computed = config.phi if config.method in ("static", "coreinfer", "partinfer", "tokenwise") else loaded
        points.append(ParetoPoint(config.method, config.weights, loaded, computed, ppl, ppl / reference,
                                  expected_bytes(model, SparseFFN)["weights"] / MIB, weight_bytes_per_token(model) / 1e6))
        del model
    report = {"model": str(model_dir), "dataset": dataset, "split": "eval", "texts": len(ids),
              "prompt_tokens": prompt_tokens, "cont_tokens": cont_tokens, "dtype": dtype,
              "phi_share": PHI_SHARE, "delta_share": DELTA_SHARE, "points": [asdict(p) for p in points]}
    output.write_text("pareto.json", json.dumps(report, indent=2))
    output.write_text("pareto.md", format_pareto(report) + "\n")
    plot_pareto(report, output.reserve("pareto.png"))
    return report


def frontier(points: list[dict], x: str) -> list[dict]:
    """The points no other point beats on both `x` and the quality ratio (lower is better for both)."""
    best = []
    for p in sorted(points, key=lambda p: (p[x], p["ratio"])):
        if not best or p["ratio"] < best[-1]["ratio"]:
            best.append(p)
    return best


def format_pareto(report: dict) -> str:
    lines = [f"Continuation perplexity on {report['texts']} texts of {report['dataset']} (eval split; selection on "
             f"{report['prompt_tokens']} tokens, {report['cont_tokens']} scored), ratio to dense bf16; φ = "
             f"{report['phi_share']:.3f}·γ, δ = {report['delta_share']:.3f}·γ. * = on the quality/memory frontier.",
             "", "| method | weights | γ | φ | perplexity | × dense bf16 | weights MiB | MB / token |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    on_frontier = {id(p) for p in frontier(report["points"], "weights_mib")}
    for p in report["points"]:
        star = " *" if id(p) in on_frontier else ""
        lines.append(f"| {p['method']} | {p['weights']} | {p['gamma']:.2f} | {p['phi']:.2f} | {p['perplexity']:.2f} | "
                     f"{p['ratio']:.2f}{star} | {p['weights_mib']:.1f} | {p['mb_per_token']:.1f} |")
    return "\n".join(lines)


def plot_pareto(report: dict, out: Path) -> Path:
    """Two panels: quality ratio against weights kept (MiB) and against bytes read per decode token."""
    from profiler.plotting import png_figure

    points = report["points"]
    with png_figure(out, ncols=2, figsize=(11, 4.5), sharey=True) as (fig, axes):
        for ax, x, label in ((axes[0], "weights_mib", "weights kept in memory (MiB)"),
                             (axes[1], "mb_per_token", "weight bytes read per decode token (MB)")):
            for weights, marker in zip(sorted({p["weights"] for p in points}), "osD^"):
                for method in sorted({p["method"] for p in points if p["method"] != "dense"}):
                    curve = sorted((p for p in points if p["weights"] == weights and p["method"] == method),
                                   key=lambda p: p[x])
                    ax.plot([p[x] for p in curve], [p["ratio"] for p in curve], marker=marker, ls="-", ms=4,
                            label=f"{method} {weights}")
                dense = [p for p in points if p["weights"] == weights and p["method"] == "dense"]
                ax.plot([p[x] for p in dense], [p["ratio"] for p in dense], marker="*", ms=12, ls="none", color="k")
                for p in dense:
                    ax.annotate(f"dense {weights}", (p[x], p["ratio"]), textcoords="offset points", xytext=(4, 6), fontsize=7)
            edge = frontier(points, x)
            ax.plot([p[x] for p in edge], [p["ratio"] for p in edge], color="grey", lw=3, alpha=0.3, label="frontier")
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("perplexity ÷ dense bf16 (lower is better)")
        axes[1].legend(fontsize=7, ncol=2)
        fig.suptitle(f"{Path(report['model']).name}: quality against memory ({report['texts']} held-out texts)", fontsize=10)
    return Path(out)
