"""The `partinfer` command line: thin typer commands over the library API.

Every command turns a `PartinferError` into `error: <message>` on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from runtime.errors import PartinferError


class ErrorHandlingGroup(TyperGroup):
    """Maps our exceptions to a one-line message and exit code 2, for every (sub)command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PartinferError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)


app = typer.Typer(
    cls=ErrorHandlingGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="partinfer: run LLMs with a fraction of their FFN neurons loaded and computed (PartInfer + CoreInfer).",
)

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Hugging Face model directory or hub id; default: the embedded SmolLM2-135M-Instruct."),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Weight and compute dtype: bf16, fp32 or fp16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON object instead of text.")]


@app.command()
def prepare(
    model: Annotated[Optional[str], typer.Argument(help="Local HF directory or hub id; omit for the default model.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Convert the default model again.")] = False,
) -> None:
    """Obtain a model (converting the embedded default GGUF to bf16 safetensors once) and print where it is."""
    from runtime.prepare import prepare_default_model, resolve_model

    path = prepare_default_model(force) if model is None else resolve_model(model)
    typer.echo(str(path))


@app.command("generate")
def generate_cmd(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt text.")],
    model: ModelOpt = None,
    chat_template: Annotated[bool, typer.Option("--chat-template/--raw", help="Wrap the prompt in the model's chat template.")] = True,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Generate text for a prompt, streaming tokens as they come; --json adds prefill and decode tokens/s."""
    from runtime.engine import load_engine
    from runtime.generate import SamplingConfig

    if not prompt.strip():
        raise PartinferError("empty prompt; pass some text with --prompt")
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)
    engine = load_engine(model, dtype, device)
    on_text = None if as_json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    texts, result = engine.generate_text([prompt], max_new_tokens, sampling, chat_template, on_text)
    if as_json:
        typer.echo(json.dumps({
            "text": texts[0], "prompt_tokens": result.prompt_tokens, "new_tokens": len(result.tokens[0]),
            "prefill_tokens_per_s": result.prefill_tps, "decode_tokens_per_s": result.decode_tps,
        }, indent=2))
    else:
        typer.echo(f"\n[{result.prompt_tokens} prompt tokens, prefill {result.prefill_tps:.1f} tok/s, "
                   f"{len(result.tokens[0])} new tokens, decode {result.decode_tps:.1f} tok/s]", err=True)


@app.command()
def bench(
    model: ModelOpt = None,
    prompt_len: Annotated[int, typer.Option("--prompt-len", min=1, help="Prompt tokens.")] = 64,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=2, help="Tokens to decode per run.")] = 64,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed runs after one warm-up; the median is shown.")] = 3,
    peers: Annotated[bool, typer.Option("--peers/--no-peers", help="Also time transformers generate() in the same run.")] = True,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Decode and prefill tokens/s against transformers and the memory-bandwidth floor, measured in one run."""
    from evaluation.bench import format_bench, run_bench

    report = run_bench(model, dtype, device, prompt_len, new_tokens, repeats, peers)
    typer.echo(json.dumps(report, indent=2) if as_json else format_bench(report))


data_app = typer.Typer(cls=ErrorHandlingGroup, no_args_is_help=True, help="Offline data sets for profiling and evaluation.")
neurons_app = typer.Typer(cls=ErrorHandlingGroup, no_args_is_help=True, help="Inspect neuron files.")
app.add_typer(data_app, name="data")
app.add_typer(neurons_app, name="neurons")


@data_app.command("fetch")
def data_fetch(
    tasks: Annotated[Optional[list[str]], typer.Argument(help="Built-in tasks; default: all.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Extract again.")] = False,
) -> None:
    """Download the bigbench source archive from PyPI once and extract the built-in tasks as JSONL."""
    from profiler.data import fetch_data

    for task, path in fetch_data(tasks, force).items():
        typer.echo(f"{task}\t{path}")


@app.command()
def profile(
    dataset: Annotated[list[str], typer.Option("--dataset", "-d", help="Built-in task (truthfulqa, squad, xsum, coqa, wikilingua), local .json/.jsonl/.txt/.parquet file, or hub data set; repeat for several.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the neuron files.")] = Path("neuron_files"),
    model: ModelOpt = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="Prompts per data set.")] = 64,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", help="Greedy tokens generated after each prompt and profiled too.")] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per forward pass.")] = 8,
    max_prompt_tokens: Annotated[int, typer.Option("--max-prompt-tokens", help="Keep only the last N tokens of a prompt.")] = 512,
    token_sparsity: Annotated[float, typer.Option("--token-sparsity", help="Fraction of a token's neurons that are its core neurons.")] = 0.2,
    core_score: Annotated[str, typer.Option("--core-score", help="abs (signed activations) or positive (CoreInfer).")] = "abs",
    split: Annotated[str, typer.Option("--split", help="Built-in tasks: profile (first half), eval (second half) or all.")] = "profile",
    column: Annotated[Optional[str], typer.Option("--column", help="Text column of a file or hub data set.")] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="Hub data set configuration.")] = None,
    hub_split: Annotated[str, typer.Option("--hub-split", help="Hub data set split.")] = "train",
    dtype: Annotated[str, typer.Option("--dtype", help="Profiling dtype; fp32 is faster than bf16 on CPUs without native bf16.")] = "fp32",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Profile data sets through the dense model; write dataset-level neuron files and a model-level one."""
    from profiler.profile import ProfileConfig, run_profile
    from runtime.engine import load_engine

    cfg = ProfileConfig(num_samples, gen_tokens, batch_size, max_prompt_tokens, token_sparsity, core_score, split)
    engine = load_engine(model, dtype, device)
    report = run_profile(engine, dataset, out, cfg, column=column, config=config, hub_split=hub_split)
    summary = {"files": {k: str(v) for k, v in report.files.items()}, "tokens": report.tokens,
               "seconds": report.seconds, "tokens_per_s": report.tokens_per_s}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        for name, path in report.files.items():
            typer.echo(f"{name}\t{path}")
        typer.echo(f"profiled {report.tokens} tokens in {report.seconds:.1f} s ({report.tokens_per_s:.1f} tokens/s)")


@neurons_app.command("show")
def neurons_show(
    files: Annotated[list[Path], typer.Argument(help="One neuron file, or two to compare their top sets.")],
    gamma: Annotated[float, typer.Option("--gamma", help="Fraction for the overlap of two files' top sets.")] = 0.7,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write coverage curves to this PNG.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Per layer, the share of activation mass carried by the top 10/20/40/70 % of neurons; overlap of two files."""
    from profiler.neuron_file import NeuronFile
    from profiler.report import coverage, format_show, plot_coverage, top_overlap

    if not 1 <= len(files) <= 2:
        raise PartinferError("give one or two neuron files")
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
        typer.echo(f"plot: {plot_coverage({f.name: nf for f, nf in zip(files, loaded)}, plot)}", err=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
