"""`partinfer pareto`: quality against memory over a grid of methods, budgets and weight formats.

A user picks an operating point from this chart: every configuration's continuation perplexity on
held-out text (the `eval` split, as `partinfer perplexity` scores it) as a ratio to dense bf16,
against the weight bytes the configuration keeps in memory and the weight bytes one decode token
reads. φ and δ follow γ at the paper's proportions (φ = 4/7 γ, δ = 3/7 γ: 0.4 and 0.3 at γ 0.7),
so each method is one curve per weight format. Memory here is the weights the loaded model holds
(`partinfer memory` measures the process around them). With `task` and `task_limit`, each configuration
is also scored on that many questions of a task as `partinfer eval` scores it (`SECOND_AXES`: TruthfulQA
MC2, or HumanEval pass@1 for a coding model), a second quality axis: score ÷ dense bf16's, where
higher is better.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from partinfer.common.formats.blocks import weight_scheme
from partinfer.common.output_dir import IncrementalOutput
from partinfer.evaluation import humaneval
from partinfer.evaluation.accuracy import OFFLINE_TASKS, run_method
from partinfer.evaluation.bench import weight_bytes_per_token
from partinfer.evaluation.memory import MIB, expected_bytes
from partinfer.evaluation.perplexity import corpus_perplexity, perplexity_texts
from partinfer.runtime.engine import parse_device, parse_dtype
from partinfer.runtime.loader import load_model
from partinfer.runtime.sparse_ffn import SparseFFN
from partinfer.runtime.sparsity import SparsityConfig
from partinfer.runtime.text import load_tokenizer

PHI_SHARE, DELTA_SHARE = 4 / 7, 3 / 7  # φ/γ and δ/γ of the paper's budget (0.4 and 0.3 at γ 0.7)


@dataclass(frozen=True)
class SecondAxis:
    task: str  # the `partinfer eval` task name
    metric: str  # its headline metric
    label: str  # how the table and chart name it
    # A task that generates (HumanEval) decodes bf16 several times slower than compact weights, which
    # score alike (docs/results.md): with a compact format in the grid it scores that format's rows and
    # the dense bf16 reference only.
    compact_rows_only: bool = False

    def scores(self, method: str, scheme: str, weights: tuple[str, ...]) -> bool:
        return not self.compact_rows_only or scheme != "bf16" or method == "dense" or weights == ("bf16",)


SECOND_AXES = {axis.task: axis for axis in (
    SecondAxis(OFFLINE_TASKS["truthfulqa_mc2"], "acc", "TruthfulQA MC2"),
    SecondAxis(humaneval.TASK, humaneval.METRIC, "HumanEval pass@1", compact_rows_only=True),
)}


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
    score: float | None = None  # the second axis's score (MC2 accuracy, pass@1), when asked for
    score_ratio: float | None = None  # score ÷ dense bf16's (1.0 = no loss, lower = a loss)
    score_stderr: float | None = None  # its standard error


def grid(methods: tuple[str, ...], gammas: tuple[float, ...], weights: tuple[str, ...],
         base: SparsityConfig) -> list[tuple[SparsityConfig, str]]:
    """(configuration, weight scheme): dense per weight scheme, then every method at every γ (φ, δ at
    the paper's proportions of γ)."""
    configs = []
    for w in weights:
        weight_scheme(w)  # an unknown name fails here, before any output
        configs.append((replace(base, method="dense"), w))
        for method in methods:
            for g in gammas:
                phi = g if method == "load-only" else round(PHI_SHARE * g, 4)
                configs.append((replace(base, method=method, gamma=g, phi=phi, delta=min(round(DELTA_SHARE * g, 4), phi)), w))
    return configs


def run_pareto(model_dir: Path, methods: tuple[str, ...], gammas: tuple[float, ...], weights: tuple[str, ...],
               base: SparsityConfig, out: Path, dataset: str = "xsum", num_samples: int = 16, prompt_tokens: int = 64,
               cont_tokens: int = 128, dtype: str = "bf16", device: str = "cpu", task: str | None = None,
               task_limit: int = 0) -> dict:
    """Score every configuration of the grid and write pareto.json, pareto.md and pareto.png into `out`;
    `task` (a `SECOND_AXES` name) with `task_limit` > 0 adds its score on that many questions per
    configuration (HumanEval, with a compact format in the grid: see `SecondAxis.compact_rows_only`)."""
    axis = SECOND_AXES[task] if task is not None and task_limit > 0 else None
    if "bf16" not in weights:
        weights = ("bf16", *weights)  # the reference every ratio is taken to
    configs = grid(methods, gammas, weights, base)  # invalid budgets fail here, before any output
    output = IncrementalOutput(out, "pareto", inputs=(model_dir,))
    ids = perplexity_texts(dataset, num_samples, load_tokenizer(model_dir), prompt_tokens + cont_tokens)
    points: list[ParetoPoint] = []
    reference = score_reference = None
    for config, scheme in tqdm(configs, desc="pareto", unit="config"):
        model = load_model(model_dir, parse_dtype(dtype), parse_device(device), config, scheme)
        ppl = corpus_perplexity(model, ids, prompt_tokens)
        weights_mib, mb_per_token = expected_bytes(model, SparseFFN)["weights"] / MIB, weight_bytes_per_token(model) / 1e6
        del model
        reference = ppl if reference is None else reference  # dense bf16 comes first
        score = score_ratio = score_stderr = None
        if axis is not None and axis.scores(config.method, scheme, weights):
            scores = run_method(model_dir, config.method, config, [axis.task], task_limit, dtype, device, 1,
                                weights=scheme)["results"][axis.task]
            score, score_stderr = scores[axis.metric], scores.get(f"{axis.metric}_stderr")
            score_reference = score if score_reference is None else score_reference
            score_ratio = score / score_reference if score_reference else None
        loaded = config.loaded_fraction
        computed = config.phi if config.method in ("static", "coreinfer", "partinfer", "tokenwise") else loaded
        points.append(ParetoPoint(config.method, scheme, loaded, computed, ppl, ppl / reference,
                                  weights_mib, mb_per_token, score, score_ratio, score_stderr))
    report = {"model": str(model_dir), "dataset": dataset, "split": "eval", "texts": len(ids),
              "prompt_tokens": prompt_tokens, "cont_tokens": cont_tokens, "dtype": dtype,
              "task": axis.task if axis else None, "task_label": axis.label if axis else None,
              "task_questions": task_limit if axis else 0,
              "phi_share": PHI_SHARE, "delta_share": DELTA_SHARE, "points": [asdict(p) for p in points]}
    output.write_text("pareto.json", json.dumps(report, indent=2))
    output.write_text("pareto.md", format_pareto(report) + "\n")
    plot_pareto(report, output.reserve("pareto.png"))
    return report


def frontier(points: list[dict], x: str, quality: str = "ratio") -> list[dict]:
    """The points no other point beats on both `x` (lower is better) and `quality`: the perplexity
    ratio (lower is better) or the second axis's ratio (higher is better)."""
    sign = -1 if quality == "score_ratio" else 1
    best = []
    for p in sorted((p for p in points if p.get(quality) is not None), key=lambda p: (p[x], sign * p[quality])):
        if not best or sign * p[quality] < sign * best[-1][quality]:
            best.append(p)
    return best


def format_pareto(report: dict) -> str:
    lines = [f"Continuation perplexity on {report['texts']} texts of {report['dataset']} (eval split; selection on "
             f"{report['prompt_tokens']} tokens, {report['cont_tokens']} scored), ratio to dense bf16; φ = "
             f"{report['phi_share']:.3f}·γ, δ = {report['delta_share']:.3f}·γ. * = on the quality/memory frontier.",
             ""]
    second = report["task_label"] if report.get("task_questions") else None
    if second:
        lines[0] += f" {second} on {report['task_questions']} questions."
    lines += ["| method | weights | γ | φ | perplexity | × dense bf16 |" + (f" {second} | ÷ dense bf16 |" if second else "")
              + " weights MiB | MB / token |", "|---|---|---:|---:|---:|---:|" + ("---:|---:|" if second else "") + "---:|---:|"]
    on_frontier = {id(p) for p in frontier(report["points"], "weights_mib")}
    on_score_frontier = {id(p) for p in frontier(report["points"], "weights_mib", "score_ratio")}
    for p in report["points"]:
        star = " *" if id(p) in on_frontier else ""
        score_ratio = "–" if p["score_ratio"] is None else f"{p['score_ratio']:.2f}"
        score = "–" if p["score"] is None else f"{p['score']:.3f}"
        cells = f" {score} | {score_ratio}{' *' if id(p) in on_score_frontier else ''} |" if second else ""
        lines.append(f"| {p['method']} | {p['weights']} | {p['gamma']:.2f} | {p['phi']:.2f} | {p['perplexity']:.2f} | "
                     f"{p['ratio']:.2f}{star} |{cells} {p['weights_mib']:.1f} | {p['mb_per_token']:.1f} |")
    return "\n".join(lines)


def plot_pareto(report: dict, out: Path) -> Path:
    """Quality ratio against weights kept (MiB) and against bytes read per decode token: one row of
    panels for perplexity, and one for the second task when it was measured."""
    from partinfer.profiler.plotting import png_figure

    points = report["points"]
    rows = [("ratio", "perplexity ÷ dense bf16 (lower is better)")]
    if report.get("task_questions"):
        rows.append(("score_ratio", f"{report['task_label']} ÷ dense bf16 (higher is better)"))
    with png_figure(out, "pareto", ncols=2, nrows=len(rows), figsize=(11, 4.5 * len(rows)), sharey="row", squeeze=False) as (fig, axes):
        for row, (quality, ylabel) in enumerate(rows):
            for ax, x, label in ((axes[row][0], "weights_mib", "weights kept in memory (MiB)"),
                                 (axes[row][1], "mb_per_token", "weight bytes read per decode token (MB)")):
                plot_quality(ax, points, x, quality)
                ax.set_xlabel(label)
            axes[row][0].set_ylabel(ylabel)
        for row in axes:
            row[1].legend(fontsize=7, ncol=2)
        fig.suptitle(f"{Path(report['model']).name}: quality against memory ({report['texts']} held-out texts)", fontsize=10)
    return Path(out)


def plot_quality(ax, points: list[dict], x: str, quality: str) -> None:
    """One panel: a curve per method and weight format, the dense formats as stars, the frontier in grey.
    Points without a ratio (a dense reference that scored 0) are left out."""
    points = [p for p in points if p.get(quality) is not None]
    if not points:
        ax.text(0.5, 0.5, "no ratio: the dense reference scored 0", ha="center", transform=ax.transAxes)
        return
    for weights, marker in zip(sorted({p["weights"] for p in points}), "osD^"):
        for method in sorted({p["method"] for p in points if p["method"] != "dense"}):
            curve = sorted((p for p in points if p["weights"] == weights and p["method"] == method), key=lambda p: p[x])
            ax.plot([p[x] for p in curve], [p[quality] for p in curve], marker=marker, ls="-", ms=4,
                    label=f"{method} {weights}")
        dense = [p for p in points if p["weights"] == weights and p["method"] == "dense"]
        ax.plot([p[x] for p in dense], [p[quality] for p in dense], marker="*", ms=12, ls="none", color="k")
        for p in dense:
            ax.annotate(f"dense {weights}", (p[x], p[quality]), textcoords="offset points", xytext=(4, 6), fontsize=7)
    reference = points[0]  # dense bf16
    if quality == "score_ratio" and reference.get("score_stderr") and reference["score"]:
        noise = reference["score_stderr"] / reference["score"]  # what one standard error of dense is, as a ratio
        ax.axhspan(1 - noise, 1 + noise, color="grey", alpha=0.12, label="dense ±1 standard error")
    edge = frontier(points, x, quality)
    ax.plot([p[x] for p in edge], [p[quality] for p in edge], color="grey", lw=3, alpha=0.3, label="frontier")
    ax.grid(alpha=0.3)
