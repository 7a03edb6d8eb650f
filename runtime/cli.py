"""The `partinfer` command line: thin typer commands over the library API.

Every command turns a `PartinferError`, a bad option and the known failures of libraries (malformed
JSON, non-UTF-8 text, a full disk, unreadable data) into `error: <message>` on stderr and exit code 2;
a genuine bug keeps its traceback, with a request to report it.
"""

from __future__ import annotations

import errno
import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from runtime.errors import PartinferError


OS_ERROR_FIXES = {
    errno.ENOSPC: "free some disk space and run again",
    errno.EDQUOT: "free some of your disk quota and run again",
    errno.EACCES: "check the permissions, or choose a path you can write",
    errno.EPERM: "check the permissions, or choose a path you can write",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOENT: "check the path",
    errno.EISDIR: "pass a file, not a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EMFILE: "raise the open-file limit (ulimit -n)",
}


def known_failure(e: BaseException) -> str | None:
    """A one-line message for failures of the user's input or environment that libraries raise; None for a bug."""
    if isinstance(e, PartinferError):
        return str(e)
    if isinstance(e, OSError) and e.errno in OS_ERROR_FIXES:
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror or 'operating system error'}{where}; {OS_ERROR_FIXES[e.errno]}"
    if isinstance(e, UnicodeError):
        return f"text that is not valid UTF-8 ({e}); save the input as UTF-8"
    if isinstance(e, json.JSONDecodeError):
        return f"malformed JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix the file"
    if isinstance(e, MemoryError):
        return "out of memory; try a smaller --gamma, a shorter context or fewer tokens"
    module = type(e).__module__ or ""
    if module.startswith(("datasets", "safetensors", "pyarrow")):
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return f"could not read the data ({type(e).__name__}: {first}); check the file and its format"
    return None


class ErrorHandlingGroup(TyperGroup):
    """Every (sub)command: our errors and known library failures become `error: <one line>` and exit 2;
    Ctrl-C exits 130; anything else is a bug, shown with its traceback and a request to report it."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except typer.TyperException as e:  # a bad option value or a missing argument, as typer words it
            ctx_of_error = getattr(e, "ctx", None)
            hint = f" (see `{ctx_of_error.command_path} --help`)" if ctx_of_error is not None else ""
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            typer.echo(f"error: {message}{hint}".replace("\n", " "), err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("\ninterrupted", err=True)
            raise typer.Exit(130)
        except Exception as e:
            message = known_failure(e)
            if message is None:
                traceback.print_exc()
                typer.echo("partinfer: this is a bug; please report it with the command you ran and the traceback above",
                           err=True)
                raise typer.Exit(1)
            typer.echo(f"error: {message}".replace("\n", " "), err=True)
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
MethodOpt = Annotated[str, typer.Option("--method", help="dense | load-only | static | coreinfer | partinfer | tokenwise (per-token choice by the gate).")]
GammaOpt = Annotated[float, typer.Option("--loaded-neurons-percent", "--gamma", help="γ: fraction of each sparse FFN layer loaded from disk.")]
DeltaOpt = Annotated[float, typer.Option("--base-neurons-percent", "--delta", help="δ: fraction always computed (base neurons from a neuron file).")]
PhiOpt = Annotated[float, typer.Option("--sparsity", "--phi", help="φ: fraction computed per sentence (δ base + ε chosen at prefill).")]
TokenSparsityOpt = Annotated[float, typer.Option("--token-sparsity", help="α: fraction of a token's neurons that are its core neurons.")]
CoreScoreOpt = Annotated[str, typer.Option("--core-score", help="abs (signed SiLU/GELU activations) or positive (CoreInfer's ReLU rule).")]
TokenScoreOpt = Annotated[str, typer.Option("--token-score", help="tokenwise ranking: scaled (|act(gate)| × the sentence's mean |up| × ‖down‖) or gate (|act(gate)| alone).")]
StartOpt = Annotated[Optional[int], typer.Option("--start-num", help="First sparse layer (default scales with depth).")]
EndOpt = Annotated[Optional[int], typer.Option("--end-num", help="Last sparse layer, inclusive.")]
ModelNeuronsOpt = Annotated[Optional[Path], typer.Option("--model-neurons", help="Model-level neuron file (default: the shipped one for the default model).")]
DatasetNeuronsOpt = Annotated[Optional[Path], typer.Option("--dataset-neurons", help="Dataset-level neuron file.")]
BaseTypeOpt = Annotated[str, typer.Option("--base-neurons-type", help="model | dataset: which neuron file gives the base neurons.")]
CpuOnlyOpt = Annotated[bool, typer.Option("--cpu-only", help="Run on the CPU even when a GPU is present.")]


def build_sparsity(model: Optional[str], method: str, gamma: float, delta: float, phi: float, token_sparsity: float,
                   core_score: str, start_num: Optional[int], end_num: Optional[int], model_neurons: Optional[Path],
                   dataset_neurons: Optional[Path], base_neurons_type: str, token_score: str = "scaled"):
    """The SparsityConfig of the command-line options; the shipped neuron file is the default-model default."""
    from runtime.defaults import shipped_model_neurons
    from runtime.sparsity import SparsityConfig

    return SparsityConfig(
        method=method, gamma=gamma, delta=delta, phi=phi, token_sparsity=token_sparsity, core_score=core_score,
        token_score=token_score, start_num=start_num, end_num=end_num, base_neurons_type=base_neurons_type,
        model_neurons=model_neurons or shipped_model_neurons(model), dataset_neurons=dataset_neurons,
    )


@app.command()
def prepare(
    model: Annotated[Optional[str], typer.Argument(help="Local HF directory or hub id; omit for the default model.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Convert the default model again.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory for the converted default model (new, empty, or an earlier `prepare --out`); default: the cache.")] = None,
) -> None:
    """Obtain a model (converting the embedded default GGUF to bf16 safetensors once) and print where it is."""
    from runtime.prepare import prepare_default_model, resolve_model

    if model is not None and out is not None:
        raise PartinferError("--out applies to the default model's conversion; omit MODEL, or omit --out")
    path = prepare_default_model(force, out) if model is None else resolve_model(model)
    typer.echo(str(path))


@app.command("generate")
def generate_cmd(
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt text (--function normal).")] = None,
    function: Annotated[str, typer.Option("--function", help="normal (one --prompt) or predefined-prompts (a built-in list).")] = "normal",
    model: ModelOpt = None,
    method: MethodOpt = "partinfer",
    gamma: GammaOpt = 0.7,
    delta: DeltaOpt = 0.3,
    phi: PhiOpt = 0.4,
    token_sparsity: TokenSparsityOpt = 0.2,
    core_score: CoreScoreOpt = "abs",
    token_score: TokenScoreOpt = "scaled",
    start_num: StartOpt = None,
    end_num: EndOpt = None,
    model_neurons: ModelNeuronsOpt = None,
    dataset_neurons: DatasetNeuronsOpt = None,
    base_neurons_type: BaseTypeOpt = "model",
    chat_template: Annotated[bool, typer.Option("--chat-template/--raw", help="Wrap the prompt in the model's chat template.")] = True,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, max=1_048_576, help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**63 - 1, help="Sampling seed.")] = 0,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Generate text, streaming tokens; each answer reports tokens/s and the fraction of FFN neurons computed."""
    from runtime.chat import PREDEFINED_PROMPTS
    from runtime.engine import load_engine
    from runtime.generate import SamplingConfig
    from runtime.sparse_ffn import sparsity_summary
    from runtime.text import require_utf8

    if function == "predefined-prompts":
        prompts = list(PREDEFINED_PROMPTS)
    elif function == "normal":
        if prompt is None or not prompt.strip():
            raise PartinferError("empty prompt; pass some text with --prompt (or --function predefined-prompts)")
        prompts = [require_utf8(prompt, "--prompt")]  # before loading a model
    else:
        raise PartinferError(f"unknown --function {function!r}; use normal or predefined-prompts")
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)
    sparsity = build_sparsity(model, method, gamma, delta, phi, token_sparsity, core_score, start_num, end_num,
                              model_neurons, dataset_neurons, base_neurons_type, token_score)
    engine = load_engine(model, dtype, device, sparsity)
    answers = []
    for text in prompts:
        if not as_json and len(prompts) > 1:
            typer.echo(f"\n>>> {text}")
        on_text = None if as_json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        texts, result = engine.generate_text([text], max_new_tokens, sampling, chat_template, on_text)
        summary = sparsity_summary(engine.model)
        answers.append({
            "prompt": text, "text": texts[0], "prompt_tokens": result.prompt_tokens, "new_tokens": len(result.tokens[0]),
            "prefill_tokens_per_s": result.prefill_tps, "decode_tokens_per_s": result.decode_tps, **summary,
        })
        if not as_json:
            typer.echo(f"\n[{method}: {result.prompt_tokens} prompt tokens, prefill {result.prefill_tps:.1f} tok/s, "
                       f"{len(result.tokens[0])} new tokens, decode {result.decode_tps:.1f} tok/s, "
                       f"FFN neurons loaded {summary['loaded_fraction']:.0%}, computed {summary['computed_fraction']:.0%}]")
    if as_json:
        typer.echo(json.dumps(answers[0] if function == "normal" else answers, indent=2))


@app.command()
def chat(
    model: ModelOpt = None,
    method: MethodOpt = "partinfer",
    gamma: GammaOpt = 0.7,
    delta: DeltaOpt = 0.3,
    phi: PhiOpt = 0.4,
    token_sparsity: TokenSparsityOpt = 0.2,
    core_score: CoreScoreOpt = "abs",
    token_score: TokenScoreOpt = "scaled",
    start_num: StartOpt = None,
    end_num: EndOpt = None,
    model_neurons: ModelNeuronsOpt = None,
    dataset_neurons: DatasetNeuronsOpt = None,
    base_neurons_type: BaseTypeOpt = "model",
    cpu_only: CpuOnlyOpt = False,
    context: Annotated[int, typer.Option("--context", min=1, max=1_048_576, help="KV cache length in tokens.")] = 2048,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, max=1_048_576, help="Reply length limit.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.0,
    dtype: DtypeOpt = "bf16",
) -> None:
    """Chat in the terminal. /reset starts over, /stats shows method, neurons, speed and memory, /exit quits.

    Ctrl-C stops the current answer; end of input (Ctrl-D) exits. Each user turn re-selects ε from its prefill.
    """
    import torch

    from runtime.chat import ChatSession
    from runtime.engine import load_engine
    from runtime.generate import SamplingConfig

    device = "cuda" if torch.cuda.is_available() and not cpu_only else "cpu"
    sparsity = build_sparsity(model, method, gamma, delta, phi, token_sparsity, core_score, start_num, end_num,
                              model_neurons, dataset_neurons, base_neurons_type, token_score)
    engine = load_engine(model, dtype, device, sparsity)
    session = ChatSession(engine, context, max_new_tokens, SamplingConfig(temperature=temperature))
    typer.echo(f"partinfer chat ({method}, γ {gamma}, φ {phi}, {device}); /reset, /stats, /exit", err=True)
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes reach the turn as lone surrogates: one error, not the end
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input("> ")
        except EOFError:
            typer.echo("", err=True)
            break
        except KeyboardInterrupt:
            typer.echo("", err=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            typer.echo("(conversation reset)", err=True)
            continue
        if text == "/stats":
            typer.echo(json.dumps(session.stats(method, gamma, phi), indent=2))
            continue
        try:
            session.turn(text, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
            r = session.last
            typer.echo(f"\n[{r.decode_tps:.1f} tok/s]", err=True)
        except KeyboardInterrupt:
            typer.echo("\n(stopped)", err=True)
        except PartinferError as e:
            typer.echo(f"\nerror: {e}", err=True)


@app.command()
def pack(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the packed checkpoint.")],
    model: ModelOpt = None,
    model_neurons: ModelNeuronsOpt = None,
) -> None:
    """Write a packed checkpoint: FFN layers permuted hot-first and bundled per neuron ([n, 3, d]) for partial loads."""
    from runtime.defaults import shipped_model_neurons
    from runtime.pack import pack_checkpoint
    from runtime.prepare import resolve_model

    neurons = model_neurons or shipped_model_neurons(model)
    if neurons is None:
        raise PartinferError("pass --model-neurons FILE (a model-level neuron file from `partinfer profile`)")
    typer.echo(str(pack_checkpoint(resolve_model(model), neurons, out)))


@app.command()
def bench(
    model: ModelOpt = None,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods to time.")] = "dense,partinfer",
    gamma: GammaOpt = 0.7,
    delta: DeltaOpt = 0.3,
    phi: PhiOpt = 0.4,
    token_score: TokenScoreOpt = "scaled",
    start_num: StartOpt = None,
    end_num: EndOpt = None,
    model_neurons: ModelNeuronsOpt = None,
    prompt_len: Annotated[int, typer.Option("--prompt-len", min=1, max=1_048_576, help="Prompt tokens.")] = 64,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=2, max=1_048_576, help="Tokens to decode per run.")] = 64,
    repeats: Annotated[int, typer.Option("--repeats", min=1, max=1000, help="Timed runs after one warm-up; the median is shown.")] = 3,
    peers: Annotated[bool, typer.Option("--peers/--no-peers", help="Also time transformers generate() in the same run.")] = True,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Prefill and decode tokens/s per method and of transformers, beside the memory-bandwidth floor, in one run."""
    from evaluation.bench import format_bench, run_bench

    sparsity = build_sparsity(model, "partinfer", gamma, delta, phi, 0.2, "abs", start_num, end_num, model_neurons,
                              None, "model", token_score)
    method_list = tuple(m.strip() for m in methods.split(",") if m.strip())
    report = run_bench(model, method_list, sparsity, dtype, device, prompt_len, new_tokens, repeats, peers)
    typer.echo(json.dumps(report, indent=2) if as_json else format_bench(report))


@app.command()
def perplexity(
    model: ModelOpt = None,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods to score.")] = "dense,load-only,static,coreinfer,partinfer",
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Built-in task (its eval split) or a local text file.")] = "xsum",
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, max=10_000_000, help="Texts to score.")] = 32,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, max=1_048_576, help="Tokens the selection sees.")] = 64,
    cont_tokens: Annotated[int, typer.Option("--cont-tokens", min=2, max=1_048_576, help="Tokens scored after them.")] = 128,
    gamma: GammaOpt = 0.7,
    delta: DeltaOpt = 0.3,
    phi: PhiOpt = 0.4,
    token_sparsity: TokenSparsityOpt = 0.2,
    core_score: CoreScoreOpt = "abs",
    token_score: TokenScoreOpt = "scaled",
    start_num: StartOpt = None,
    end_num: EndOpt = None,
    model_neurons: ModelNeuronsOpt = None,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Continuation perplexity per method on held-out text: what each way of choosing neurons costs in accuracy."""
    from evaluation.perplexity import format_perplexity, run_perplexity

    sparsity = build_sparsity(model, "partinfer", gamma, delta, phi, token_sparsity, core_score, start_num, end_num,
                              model_neurons, None, "model", token_score)
    method_list = tuple(m.strip() for m in methods.split(",") if m.strip())
    report = run_perplexity(model, method_list, sparsity, dataset, num_samples, prompt_tokens, cont_tokens, dtype, device)
    typer.echo(json.dumps(report, indent=2) if as_json else format_perplexity(report))


@app.command("eval")
def evaluate(
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated: offline truthfulqa_mc1, truthfulqa_mc2, squad, coqa, xsum, perplexity, or any lm-eval task name (needs the hub).")] = "truthfulqa_mc1,truthfulqa_mc2,squad,coqa,xsum,perplexity",
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods, dense first for the ratios.")] = "dense,load-only,static,coreinfer,partinfer,tokenwise",
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for raw/<method>.json and results.md.")] = Path("eval_results"),
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, max=10_000_000, help="Examples per task (default: all of the eval split).")] = None,
    model: ModelOpt = None,
    gamma: GammaOpt = 0.7,
    delta: DeltaOpt = 0.3,
    phi: PhiOpt = 0.4,
    token_sparsity: TokenSparsityOpt = 0.2,
    core_score: CoreScoreOpt = "abs",
    token_score: TokenScoreOpt = "scaled",
    start_num: StartOpt = None,
    end_num: EndOpt = None,
    model_neurons: ModelNeuronsOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=4096, help="Generation tasks: sequences per batch (on a CPU, 1 is fastest: it takes the compiled one-token decode).")] = 1,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Reuse a method's raw results from an earlier run with the same settings.")] = True,
    table_only: Annotated[bool, typer.Option("--table-only", help="Run nothing: rewrite the table from the raw results in --out.")] = False,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Accuracy by method with lm-eval: raw results per method and a task × method table with ratios to dense."""
    from evaluation.accuracy import format_table, resolve_tasks, run_eval
    from runtime.prepare import resolve_model

    sparsity = build_sparsity(model, "partinfer", gamma, delta, phi, token_sparsity, core_score, start_num, end_num,
                              model_neurons, None, "model", token_score)
    method_list = tuple(m.strip() for m in methods.split(",") if m.strip())
    task_list = resolve_tasks([t.strip() for t in tasks.split(",") if t.strip()])
    report = run_eval(resolve_model(model), task_list, method_list, sparsity, out, limit, dtype, device, batch_size,
                      resume, table_only)
    typer.echo(json.dumps(report, indent=2) if as_json else format_table(report))
    typer.echo(f"wrote {out / 'results.md'} and {out / 'raw'}/", err=True)


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
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, max=10_000_000, help="Prompts per data set.")] = 64,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", min=0, max=1_048_576, help="Greedy tokens generated after each prompt and profiled too.")] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=4096, help="Prompts per forward pass.")] = 8,
    max_prompt_tokens: Annotated[int, typer.Option("--max-prompt-tokens", min=1, max=1_048_576, help="Keep only the last N tokens of a prompt.")] = 512,
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
    from profiler.profile import ProfileConfig, profile_inputs, run_profile
    from runtime.engine import load_engine
    from runtime.output_dir import check_output_dir
    from runtime.prepare import resolve_model

    cfg = ProfileConfig(num_samples, gen_tokens, batch_size, max_prompt_tokens, token_sparsity, core_score, split)
    model_dir = resolve_model(model)
    check_output_dir(out, "profile", profile_inputs(model_dir, dataset))  # before loading anything
    engine = load_engine(str(model_dir), dtype, device)
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
    gamma: Annotated[float, typer.Option("--gamma", min=0.0, max=1.0, help="Fraction for the overlap of two files' top sets.")] = 0.7,
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


@app.command()
def memory(
    model: ModelOpt = None,
    model_neurons: ModelNeuronsOpt = None,
    gamma: Annotated[Optional[list[float]], typer.Option("--gamma", min=0.0, max=1.0, help="γ values to measure (repeat); default 0.9 0.8 0.7 0.5.")] = None,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated sparse methods to measure besides dense.")] = "load-only,partinfer",
    phi: PhiOpt = 0.4,
    delta: DeltaOpt = 0.3,
    packed: Annotated[bool, typer.Option("--packed/--plain", help="Read sparse configurations from a packed copy (made once in the cache).")] = True,
    peers: Annotated[bool, typer.Option("--peers/--no-peers", help="Also measure transformers on the same weights.")] = True,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "cpu",
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write measured vs expected memory against γ to this PNG.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure resident memory per configuration, each in a fresh process, against the bytes it should keep."""
    from evaluation.memory import DEFAULT_GAMMAS, format_memory, plot_memory, run_memory
    from runtime.defaults import shipped_model_neurons
    from runtime.prepare import resolve_model

    method_list = tuple(m for m in methods.split(",") if m.strip() and m != "dense")
    report = run_memory(resolve_model(model), model_neurons or shipped_model_neurons(model), tuple(gamma or DEFAULT_GAMMAS),
                        method_list, phi, delta, dtype, device, packed, peers,
                        progress=lambda name: typer.echo(f"measuring {name} ...", err=True))
    typer.echo(json.dumps(report, indent=2) if as_json else format_memory(report))
    if plot is not None:
        typer.echo(f"plot: {plot_memory(report, plot)}", err=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
