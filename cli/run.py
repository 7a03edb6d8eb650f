"""`partinfer generate` and `partinfer chat`: text in, text out, with the neurons computed reported."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from partinfer.cli.options import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, WeightsOpt, with_sparsity_options
from partinfer.common.errors import PartinferError
from partinfer.runtime.sparsity import SparsityConfig


@with_sparsity_options()
def generate(
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt text (--function normal).")] = None,
    function: Annotated[str, typer.Option("--function", help="normal (one --prompt) or predefined-prompts (a built-in list).")] = "normal",
    model: ModelOpt = None,
    chat_template: Annotated[bool, typer.Option("--chat-template/--raw", help="Wrap the prompt in the model's chat template.")] = True,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, max=1_048_576, help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**63 - 1, help="Sampling seed.")] = 0,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "cpu",
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
    *,
    sparsity: SparsityConfig,
) -> None:
    """Generate text, streaming tokens; each answer reports tokens/s and the fraction of FFN neurons computed."""
    from partinfer.runtime.chat import PREDEFINED_PROMPTS
    from partinfer.runtime.engine import load_engine
    from partinfer.runtime.generate import SamplingConfig
    from partinfer.runtime.sparse_ffn import sparsity_summary
    from partinfer.runtime.text import require_utf8

    if function == "predefined-prompts":
        prompts = list(PREDEFINED_PROMPTS)
    elif function == "normal":
        if prompt is None or not prompt.strip():
            raise PartinferError("empty prompt; pass some text with --prompt (or --function predefined-prompts)")
        prompts = [require_utf8(prompt, "--prompt")]  # before loading a model
    else:
        raise PartinferError(f"unknown --function {function!r}; use normal or predefined-prompts")
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)
    engine = load_engine(model, dtype, device, sparsity, weights)
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
            typer.echo(f"\n[{sparsity.method}: {result.prompt_tokens} prompt tokens, prefill {result.prefill_tps:.1f} tok/s, "
                       f"{len(result.tokens[0])} new tokens, decode {result.decode_tps:.1f} tok/s, "
                       f"FFN neurons loaded {summary['loaded_fraction']:.0%}, computed {summary['computed_fraction']:.0%}]")
    if as_json:
        typer.echo(json.dumps(answers[0] if function == "normal" else answers, indent=2))


@with_sparsity_options()
def chat(
    model: ModelOpt = None,
    cpu_only: Annotated[bool, typer.Option("--cpu-only", help="Run on the CPU even when a GPU is present.")] = False,
    context: Annotated[int, typer.Option("--context", min=1, max=1_048_576, help="KV cache length in tokens.")] = 2048,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, max=1_048_576, help="Reply length limit.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.0,
    dtype: DtypeOpt = "bf16",
    weights: WeightsOpt = None,
    *,
    sparsity: SparsityConfig,
) -> None:
    """Chat in the terminal. /reset starts over, /stats shows method, neurons, speed and memory, /exit quits.

    Ctrl-C stops the current answer; end of input (Ctrl-D) exits. Each user turn re-selects ε from its
    prefill. A line that is not valid UTF-8 is an error message, and the session goes on.
    """
    import torch

    from partinfer.runtime.chat import ChatSession
    from partinfer.runtime.engine import load_engine
    from partinfer.runtime.generate import SamplingConfig

    device = "cuda" if torch.cuda.is_available() and not cpu_only else "cpu"
    engine = load_engine(model, dtype, device, sparsity, weights)
    session = ChatSession(engine, context, max_new_tokens, SamplingConfig(temperature=temperature))
    typer.echo(f"partinfer chat ({sparsity.method}, γ {sparsity.gamma}, φ {sparsity.phi}, {device}); /reset, /stats, /exit",
               err=True)
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
            typer.echo(json.dumps(session.stats(sparsity.method, sparsity.gamma, sparsity.phi), indent=2))
            continue
        try:
            session.turn(text, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
            typer.echo(f"\n[{session.last.decode_tps:.1f} tok/s]", err=True)
        except KeyboardInterrupt:
            typer.echo("\n(stopped)", err=True)
        except PartinferError as e:
            typer.echo(f"\nerror: {e}", err=True)
