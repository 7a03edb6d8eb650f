"""`partinfer profile`, `compensate`, `data fetch` and `neurons show|merge|sensitivity`: the offline half."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from partinfer.cli.options import DeviceOpt, JsonOpt, ModelOpt, with_sparsity_options
from partinfer.common.errors import PartinferError
from partinfer.runtime.sparsity import SparsityConfig


def profile(
    dataset: Annotated[list[str], typer.Option("--dataset", "-d", help="Built-in task (truthfulqa, squad, xsum, coqa, wikilingua), local .json/.jsonl/.txt/.parquet file, or hub data set; repeat for several.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the neuron files (new, empty, or an earlier `profile --out`).")] = Path("neuron_files"),
    model: ModelOpt = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, max=10_000_000, help="Prompts per data set.")] = 64,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", min=0, max=1_048_576, help="Greedy tokens generated after each prompt and profiled too.")] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=4096, help="Prompts per forward pass.")] = 8,
    max_prompt_tokens: Annotated[int, typer.Option("--max-prompt-tokens", min=1, max=1_048_576, help="Keep only the last N tokens of a prompt.")] = 512,
    token_sparsity: Annotated[float, typer.Option("--token-sparsity", help="Fraction of a token's neurons that are its core neurons.")] = 0.2,
    core_score: Annotated[str, typer.Option("--core-score", help="abs (signed activations) or positive (CoreInfer).")] = "abs",
    split: Annotated[str, typer.Option("--split", help="Built-in tasks: profile (first half), eval (second half) or all.")] = "profile",
    rank_by: Annotated[str, typer.Option("--rank-by", help="contribution (mean |a| · ‖down‖, the down norms stored in the file) or mean_abs (PartInfer's mean |a|).")] = "contribution",
    column: Annotated[Optional[str], typer.Option("--column", help="Text column of a file or hub data set.")] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="Hub data set configuration.")] = None,
    hub_split: Annotated[str, typer.Option("--hub-split", help="Hub data set split.")] = "train",
    dtype: Annotated[str, typer.Option("--dtype", help="Profiling dtype; fp32 is faster than bf16 on CPUs without native bf16.")] = "fp32",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Profile data sets through the dense model; write dataset-level neuron files and a model-level one.

    Runs unchanged under `torchrun --nproc-per-node N` (and multi-node torchrun): each process profiles
    a shard of every data set, the statistics are summed over processes, and rank 0 writes the files.
    """
    from partinfer.common.output_dir import check_output_dir
    from partinfer.profiler.distributed import process_group
    from partinfer.profiler.profile import ProfileConfig, profile_inputs, run_profile
    from partinfer.runtime.engine import load_engine
    from partinfer.runtime.prepare import resolve_model

    cfg = ProfileConfig(num_samples, gen_tokens, batch_size, max_prompt_tokens, token_sparsity, core_score, split,
                        rank_by=rank_by)
    model_dir = resolve_model(model)
    check_output_dir(out, "profile", profile_inputs(model_dir, dataset))  # before loading anything
    with process_group(device) as ranks:  # several processes under torchrun, else one
        engine = load_engine(str(model_dir), dtype, f"cuda:{ranks.rank}" if device == "cuda" and ranks.distributed
                             else device)
        report = run_profile(engine, dataset, out, cfg, ranks, column=column, config=config, hub_split=hub_split)
    if not ranks.is_main:
        return  # rank 0 wrote the files and reports them
    summary = {"files": {k: str(v) for k, v in report.files.items()}, "tokens": report.tokens,
               "seconds": report.seconds, "tokens_per_s": report.tokens_per_s}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        for name, path in report.files.items():
            typer.echo(f"{name}\t{path}")
        typer.echo(f"profiled {report.tokens} tokens in {report.seconds:.1f} s ({report.tokens_per_s:.1f} tokens/s)")


def data_fetch(
    tasks: Annotated[Optional[list[str]], typer.Argument(help="Built-in tasks; default: all.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Extract again.")] = False,
) -> None:
    """Download the bigbench source archive from PyPI once and extract the built-in tasks as JSONL."""
    from partinfer.common.data import fetch_data

    for task, path in fetch_data(tasks, force).items():
        typer.echo(f"{task}\t{path}")


def neurons_show(
    files: Annotated[list[Path], typer.Argument(help="One neuron file, or two to compare their top sets.")],
    gamma: Annotated[float, typer.Option("--gamma", min=0.0, max=1.0, help="Fraction for the overlap of two files' top sets.")] = 0.7,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write coverage curves to this PNG.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Per layer, the share of activation mass carried by the top 10/20/40/70 % of neurons; overlap of two files."""
    from partinfer.common.neuron_file import NeuronFile
    from partinfer.common.output_file import check_output_file
    from partinfer.profiler.report import coverage, format_show, plot_coverage, top_overlap

    if not 1 <= len(files) <= 2:
        raise PartinferError("give one or two neuron files")
    if plot is not None:
        check_output_file(plot, "neurons show", inputs=files)  # before any work
    loaded = [NeuronFile.load(f) for f in files]
    if len(loaded) == 2 and loaded[0].fingerprint != loaded[1].fingerprint:
        raise PartinferError(f"{files[0]} and {files[1]} are for different models; compare files of one model")
    if as_json:
        report = {str(f): {"coverage": coverage(nf)} for f, nf in zip(files, loaded)}
        if len(loaded) == 2:
            report["overlap"] = top_overlap(loaded[0], loaded[1], gamma)
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(format_show(files, loaded, gamma))
    if plot is not None:
        typer.echo(f"plot: {plot_coverage({f.name: nf for f, nf in zip(files, loaded)}, plot, tuple(files))}", err=True)


def refuse_to_replace(out: Path, force: bool, load: Callable[[Path], object], what: str) -> None:
    """A single-file `--out` may exist only with --force, and only as a file of the same kind (`load`
    raises a one-line error otherwise): never anything a user made."""
    if out.exists():
        if not force:
            raise PartinferError(f"--out {out} exists; choose a new path, or pass --force to replace that {what}")
        load(out)


def neurons_merge(
    files: Annotated[list[Path], typer.Argument(help="Neuron files of one model, profiled with the same settings.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The merged neuron file (a new path, or --force).")],
    force: Annotated[bool, typer.Option("--force", help="Replace --out when it is an existing neuron file.")] = False,
) -> None:
    """Merge neuron files made apart (shards, machines, data sets): sums and counts add, so the result
    equals one profile over all their data. One data set gives a dataset-level file, several a model-level one."""
    from partinfer.common.neuron_file import NeuronFile, merge

    if len(files) < 2:
        raise PartinferError("give two or more neuron files to merge")
    refuse_to_replace(out, force, NeuronFile.load, "neuron file")
    loaded = [NeuronFile.load(f) for f in files]
    seen: dict[str, Path] = {}
    for path, nf in zip(files, loaded):  # the same statistics twice would count their tokens twice
        if nf.digest in seen:
            raise PartinferError(f"{path} holds the same statistics as {seen[nf.digest]}; give each file once")
        seen[nf.digest] = path
    merged = merge(loaded, names=[str(f) for f in files])
    typer.echo(f"{merged.save(out)}\t{merged.level}-level, {merged.tokens} tokens, {merged.sequences} sequences")


@with_sparsity_options(exclude=("method", "phi", "token_sparsity", "core_score", "token_score", "compensation"))
def compensate(
    out: Annotated[Path, typer.Option("--out", "-o", help="The compensation file to write (a new path, or --force).")],
    dataset: Annotated[list[str], typer.Option("--dataset", "-d", help="Calibration data: built-in tasks (their profile split) or local files; repeat for several.")] = ["truthfulqa", "squad", "xsum", "coqa", "wikilingua"],
    model: ModelOpt = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, max=10_000_000, help="Prompts per data set.")] = 32,
    rank: Annotated[int, typer.Option("--rank", min=1, max=65_536, help="Rank r of each layer's map (2·r·d weights; the model width = full rank).")] = 64,
    ridge: Annotated[float, typer.Option("--ridge", min=0.0, max=1e6, help="Ridge λ, relative to the mean diagonal of XᵀX.")] = 1e-3,
    max_prompt_tokens: Annotated[int, typer.Option("--max-prompt-tokens", min=1, max=1_048_576, help="Keep only the last N tokens of a prompt.")] = 512,
    force: Annotated[bool, typer.Option("--force", help="Replace --out when it is an existing compensation file.")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="Fitting dtype (fp32 recommended).")] = "fp32",
    device: DeviceOpt = "cpu",
    *,
    sparsity: SparsityConfig,
) -> None:
    """Fit, per sparse layer, a low-rank map from the FFN input to what the neurons that a budget does not
    load would add; `--compensation FILE` then adds it at prefill and decode (same γ, δ, neuron files)."""
    from dataclasses import replace

    from partinfer.common.compensation_file import Compensation
    from partinfer.common.data import load_texts
    from partinfer.profiler.compensation import fit_compensation
    from partinfer.runtime.engine import load_engine
    from partinfer.runtime.config import ModelConfig
    from partinfer.runtime.prepare import resolve_model
    from partinfer.runtime.sparsity import plan_layers

    refuse_to_replace(out, force, Compensation.load, "compensation file")
    model_dir = resolve_model(model)
    plans = plan_layers(replace(sparsity, method="load-only"), ModelConfig.from_dir(model_dir))
    texts = {name: load_texts(name, num_samples) for name in dataset}
    engine = load_engine(str(model_dir), dtype, device)
    comp = fit_compensation(engine, texts, plans, rank, ridge, max_prompt_tokens)
    typer.echo(f"{comp.save(out)}\t{len(comp.a)} layers, rank {comp.rank}, {comp.tokens} tokens")


def neurons_contribution(
    file: Annotated[Path, typer.Argument(help="A neuron file profiled without down norms (rank_by mean_abs).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The copy of FILE ranked by contribution (a new path, or --force).")],
    model: ModelOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out when it is an existing neuron file.")] = False,
) -> None:
    """Write a copy of FILE ranked by each neuron's expected contribution, mean |a| · ‖down‖ (the down
    norms read from the model's checkpoint), as `partinfer profile` now ranks; sensitivities are dropped."""
    from partinfer.common.neuron_file import NeuronFile
    from partinfer.profiler.profile import with_down_norms
    from partinfer.runtime.config import ModelConfig
    from partinfer.runtime.prepare import resolve_model

    refuse_to_replace(out, force, NeuronFile.load, "neuron file")
    model_dir = resolve_model(model)
    neurons = NeuronFile.load(file, ModelConfig.from_dir(model_dir).fingerprint)
    typer.echo(f"{with_down_norms(neurons, model_dir).save(out)}\tranked by contribution, {neurons.n_layers} layers")


def neurons_sensitivity(
    file: Annotated[Path, typer.Argument(help="The neuron file whose ranking decides what each layer keeps (the base file of --budget profiled).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The copy of FILE with the sensitivities (a new path, or --force).")],
    gamma: Annotated[float, typer.Option("--gamma", min=0.0, max=1.0, help="γ: the loaded fraction to measure at; --budget profiled then needs the same --gamma.")] = 0.7,
    dataset: Annotated[list[str], typer.Option("--dataset", "-d", help="Calibration data: built-in tasks (their profile split) or local files; repeat for several.")] = ["truthfulqa", "squad", "xsum", "coqa", "wikilingua"],
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, max=10_000_000, help="Prompts per data set.")] = 4,
    max_prompt_tokens: Annotated[int, typer.Option("--max-prompt-tokens", min=2, max=1_048_576, help="Keep only the first N tokens of a prompt.")] = 128,
    model: ModelOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out when it is an existing neuron file.")] = False,
    device: DeviceOpt = "cpu",
) -> None:
    """Measure each layer's sensitivity to loading only γ of its neurons (the logits' KL from dense when
    that layer alone is cut) and write FILE with them added: what `--budget profiled` spreads the
    loaded neurons by."""
    from dataclasses import replace

    from partinfer.common.data import load_texts
    from partinfer.common.neuron_file import NeuronFile
    from partinfer.profiler.sensitivity import measure_sensitivity
    from partinfer.runtime.engine import load_engine
    from partinfer.runtime.prepare import resolve_model

    if not 0 < gamma <= 1:
        raise PartinferError(f"--gamma must be in (0, 1], got {gamma}")
    refuse_to_replace(out, force, NeuronFile.load, "neuron file")
    engine = load_engine(str(resolve_model(model)), "fp32", device)
    neurons = NeuronFile.load(file, engine.model.cfg.fingerprint)
    texts = [t for name in dataset for t in load_texts(name, num_samples)]
    prompts = [ids for ids in (engine.encode(t, chat_template=False)[:max_prompt_tokens] for t in texts) if len(ids) >= 2]
    if not prompts:
        raise PartinferError("the calibration data holds no prompt of two or more tokens; pass other --dataset")
    sens = measure_sensitivity(engine.model, neurons, prompts, gamma)
    replace(neurons, sensitivity=sens).save(out)
    low, high = min(sens.kl, key=sens.kl.get), max(sens.kl, key=sens.kl.get)
    typer.echo(f"{out}\tγ {gamma}, {sens.texts} prompts, {sens.tokens} tokens; KL per token from "
               f"{sens.kl[low]:.4f} (layer {low}) to {sens.kl[high]:.4f} (layer {high})")
