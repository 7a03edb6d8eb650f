"""`partinfer bench`, `perplexity`, `memory` and `eval`: speed, accuracy and memory, method beside method."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from partinfer.cli.options import (DeviceOpt, DtypeOpt, JsonOpt, MethodsOpt, ModelOpt, WeightsOpt, split_list,
                                   with_sparsity_options)
from partinfer.runtime.sparsity import SparsityConfig


@with_sparsity_options(exclude=("method",))
def bench(
    model: ModelOpt = None,
    methods: MethodsOpt = "dense,partinfer",
    prompt_len: Annotated[int, typer.Option("--prompt-len", min=1, max=1_048_576, help="Prompt tokens.")] = 64,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=2, max=1_048_576, help="Tokens to decode per run.")] = 64,
    repeats: Annotated[int, typer.Option("--repeats", min=1, max=1000, help="Timed runs after one warm-up; the median is shown.")] = 3,
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=100, help="Time every row this many times over, all rows per round, and show the median of the rounds, each round's decode, and ratios to llama.cpp within each round (a shared machine's speed drifts between rows timed minutes apart).")] = 1,
    peers: Annotated[bool, typer.Option("--peers/--no-peers", help="Also time transformers generate() (and llama.cpp where installed) in the same run.")] = True,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "cpu",
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
    *,
    sparsity: SparsityConfig,
) -> None:
    """Prefill and decode tokens/s per method and of transformers, beside the memory-bandwidth floor, in one run."""
    from partinfer.evaluation.bench import format_bench, run_bench

    report = run_bench(model, split_list(methods), sparsity, dtype, device, prompt_len, new_tokens, repeats, peers, weights,
                        rounds=rounds)
    typer.echo(json.dumps(report, indent=2) if as_json else format_bench(report))


@with_sparsity_options(exclude=("method",))
def perplexity(
    model: ModelOpt = None,
    methods: MethodsOpt = "dense,load-only,static,coreinfer,partinfer",
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Built-in task (its eval split) or a local text file.")] = "xsum",
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, max=10_000_000, help="Texts to score.")] = 32,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, max=1_048_576, help="Tokens the selection sees.")] = 64,
    cont_tokens: Annotated[int, typer.Option("--cont-tokens", min=2, max=1_048_576, help="Tokens scored after them.")] = 128,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "cpu",
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
    *,
    sparsity: SparsityConfig,
) -> None:
    """Continuation perplexity per method on held-out text: what each way of choosing neurons costs in accuracy."""
    from partinfer.evaluation.perplexity import format_perplexity, run_perplexity

    report = run_perplexity(model, split_list(methods), sparsity, dataset, num_samples, prompt_tokens, cont_tokens,
                            dtype, device, weights)
    typer.echo(json.dumps(report, indent=2) if as_json else format_perplexity(report))


@with_sparsity_options(exclude=("method", "gamma"))
def memory(
    model: ModelOpt = None,
    gamma: Annotated[Optional[list[float]], typer.Option("--gamma", min=0.0, max=1.0, help="γ values to measure (repeat); default 0.9 0.8 0.7 0.5.")] = None,
    methods: MethodsOpt = "load-only,partinfer,tokenwise",
    packed: Annotated[bool, typer.Option("--packed/--plain", help="Read sparse configurations from a packed copy (made once in the cache).")] = True,
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=100, help="Time every row this many times over, all rows per round, and show the median of the rounds, each round's decode, and ratios to llama.cpp within each round (a shared machine's speed drifts between rows timed minutes apart).")] = 1,
    peers: Annotated[bool, typer.Option("--peers/--no-peers", help="Also measure transformers on the same weights.")] = True,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "cpu",
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write measured vs expected memory against γ to this PNG.")] = None,
    weights: WeightsOpt = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, max=1_048_576, help="Prompt length each configuration prefills (random tokens).")] = 32,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, max=1_048_576, help="Tokens each configuration generates after the prompt.")] = 16,
    as_json: JsonOpt = False,
    *,
    sparsity: SparsityConfig,
) -> None:
    """Measure resident memory per configuration, each in a fresh process, against the bytes it should keep:
    after loading, after generating, and the peak of each."""
    from partinfer.common.output_file import check_output_file
    from partinfer.evaluation.memory import DEFAULT_GAMMAS, format_memory, plot_memory, run_memory
    from partinfer.runtime.prepare import resolve_model

    if plot is not None:
        check_output_file(plot, "memory")  # before the measurements
    sparse_methods = tuple(m for m in split_list(methods) if m != "dense")
    report = run_memory(resolve_model(model), sparsity, tuple(gamma or DEFAULT_GAMMAS), sparse_methods, dtype, device,
                        packed, peers, progress=lambda name: typer.echo(f"measuring {name} ...", err=True), weights=weights,
                        prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    typer.echo(json.dumps(report, indent=2) if as_json else format_memory(report))
    if plot is not None:
        typer.echo(f"plot: {plot_memory(report, plot)}", err=True)


@with_sparsity_options(exclude=("method",))
def evaluate(
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated: offline truthfulqa_mc1, truthfulqa_mc2, squad, coqa, xsum, perplexity, humaneval (pass@1 of code run in a contained child; needs a chat model), or any lm-eval task name (needs the hub).")] = "truthfulqa_mc1,truthfulqa_mc2,squad,coqa,xsum,perplexity",
    methods: MethodsOpt = "dense,load-only,static,coreinfer,partinfer,tokenwise",
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for raw/<method>.json and results.md (new, empty, or an earlier `eval --out`).")] = Path("eval_results"),
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, max=10_000_000, help="Examples per task (default: all of the eval split).")] = None,
    model: ModelOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=4096, help="Generation tasks: sequences per batch (on a CPU, 1 is fastest: it takes the compiled one-token decode).")] = 1,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Reuse a method's raw results from an earlier run with the same settings.")] = True,
    table_only: Annotated[bool, typer.Option("--table-only", help="Run nothing: rewrite the table from the raw results in --out.")] = False,
    include_path: Annotated[Optional[Path], typer.Option("--include-path", help="A directory of your own lm-eval task YAMLs (as lm_eval --include_path); --tasks may then name them.")] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=100, help="Time every row this many times over, all rows per round, and show the median of the rounds, each round's decode, and ratios to llama.cpp within each round (a shared machine's speed drifts between rows timed minutes apart).")] = 1,
    peers: Annotated[bool, typer.Option("--peers/--no-peers", help="With humaneval: also llama.cpp on the model's GGUF, same prompts, greedy (when installed).")] = True,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "cpu",
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
    *,
    sparsity: SparsityConfig,
) -> None:
    """Accuracy by method with lm-eval: raw results per method and a task × method table with ratios to dense."""
    from partinfer.evaluation.accuracy import format_table, resolve_tasks, run_eval
    from partinfer.runtime.prepare import resolve_model

    task_list = resolve_tasks(list(split_list(tasks)))
    report = run_eval(resolve_model(model), task_list, split_list(methods), sparsity, out, limit, dtype, device,
                      batch_size, resume, table_only, include_path, weights, peers)
    typer.echo(json.dumps(report, indent=2) if as_json else format_table(report))
    typer.echo(f"wrote {out / 'results.md'} and {out / 'raw'}/", err=True)


@with_sparsity_options(exclude=("method", "gamma", "delta", "phi"))
def pareto(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for pareto.md, pareto.json and pareto.png (new, empty, or an earlier `pareto --out`).")],
    model: ModelOpt = None,
    methods: MethodsOpt = "load-only,partinfer,tokenwise",
    gamma: Annotated[Optional[list[float]], typer.Option("--gamma", min=0.01, max=1.0, help="γ values of the grid (repeat); φ and δ follow at the paper's proportions. Default 0.5 0.6 0.7 0.8 0.9.")] = None,
    weights: Annotated[str, typer.Option("--weights", help="Comma-separated weight formats (bf16 is always included: the reference).")] = "bf16,q4",
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Built-in task (its eval split) or a local text file.")] = "xsum",
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, max=10_000_000, help="Texts to score per configuration.")] = 16,
    mc2: Annotated[int, typer.Option("--mc2", min=0, max=10_000_000, help="Also score this many TruthfulQA MC2 questions per configuration (through lm-eval); 0: perplexity only.")] = 0,
    humaneval: Annotated[int, typer.Option("--humaneval", min=0, max=164, help="Also score pass@1 on this many HumanEval problems per configuration (a chat model for code; with a compact format in --weights, its rows and dense bf16 only); 0: none.")] = 0,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "cpu",
    *,
    sparsity: SparsityConfig,
) -> None:
    """Quality (perplexity ÷ dense bf16, and MC2 with --mc2 or HumanEval pass@1 with --humaneval) against memory and bytes per token over a grid of methods, γ and
    weight formats: the chart to pick an operating point from."""
    from partinfer.common.errors import PartinferError
    from partinfer.evaluation import humaneval as code_task
    from partinfer.evaluation.accuracy import OFFLINE_TASKS
    from partinfer.evaluation.pareto import format_pareto, run_pareto
    from partinfer.runtime.prepare import resolve_model

    if mc2 and humaneval:
        raise PartinferError("--mc2 and --humaneval are both a second quality axis; give one of them")
    task, task_limit = (OFFLINE_TASKS["truthfulqa_mc2"], mc2) if mc2 else (code_task.TASK, humaneval)
    report = run_pareto(resolve_model(model), tuple(m for m in split_list(methods) if m != "dense"),
                        tuple(gamma or (0.5, 0.6, 0.7, 0.8, 0.9)), split_list(weights), sparsity, out, dataset,
                        num_samples, dtype=dtype, device=device, task=task, task_limit=task_limit)
    typer.echo(format_pareto(report))
    typer.echo(f"wrote {out / 'pareto.md'}, {out / 'pareto.json'} and {out / 'pareto.png'}", err=True)
