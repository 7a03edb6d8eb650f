"""The bench's peers, each run in a child process: transformers `generate()` on the same weights and
llama.cpp (llama-cpp-python, an optional extra) on the GGUF the model was converted from.

A peer is outside our control (a llama.cpp build can trap on an instruction the CPU advertises but
the VM forbids: AMX, seen as SIGILL), so `run_child` starts `python -m <module>`, writes the spec to
its stdin and reads one JSON line back; a child that dies by a signal, exits non-zero or runs past
its time becomes an outcome with a one-line `error`, and the bench prints the rest of its table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from partinfer.common.errors import PartinferError

PEER_MODULE = "partinfer.evaluation.peers"
PEER_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class PeerOutcome:
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    error: str | None = None  # one line: why there are no numbers


def peer_specs(model_dir: Path, dtype: str, device: str, prompt: list[int], new_tokens: int,
               repeats: int) -> list[tuple[str, dict, int | None]]:
    """(row name, spec, bytes per token or None for the dense model's) of every peer that applies: the
    transformers peer always, llama.cpp when installed and the model came from a GGUF."""
    common = {"prompt": prompt, "new_tokens": new_tokens, "repeats": repeats, "threads": torch.get_num_threads()}
    specs = [("transformers generate()", {"kind": "transformers", "model": str(model_dir), "dtype": dtype,
                                          "device": device, **common}, None)]
    gguf = llama_cpp_gguf(model_dir)
    if gguf is not None and device.startswith("cpu"):
        specs.append((f"llama.cpp ({gguf.name})", {"kind": "llama.cpp", "model": str(gguf), **common},
                      gguf_decode_bytes(gguf)))
    return specs


def gguf_decode_bytes(path: Path) -> int:
    """The bytes of a GGUF's tensors that llama.cpp reads per decoded token: all of them, less the token
    embedding where the model has its own output head (a token reads one embedding row): counting the
    whole file put llama.cpp above its bandwidth floor on an untied model."""
    import gguf

    try:
        tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    except (OSError, ValueError) as e:
        raise PartinferError(f"cannot read the GGUF {path} ({e}); set the model up again with `partinfer prepare`") from e
    total = sum(tensors.values())
    return total - tensors["token_embd.weight"] if "output.weight" in tensors and "token_embd.weight" in tensors else total


def run_child(spec: dict, module: str = PEER_MODULE, timeout: float = PEER_TIMEOUT_S,
              show_progress: bool = False) -> tuple[dict | None, str | None]:
    """Run `python -m module` on `spec` (as JSON on its stdin) in a fresh interpreter: (its JSON result,
    None), or (None, one line saying why there is none). A failure is returned, never raised.
    `show_progress`: the child's stderr (its progress bar) goes to ours instead of being kept for the error."""
    try:
        done = subprocess.run([sys.executable, "-m", module], input=json.dumps(spec), capture_output=not show_progress,
                              stdout=subprocess.PIPE if show_progress else None, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 1))})
    except subprocess.TimeoutExpired:
        return None, f"ran past {timeout:.0f} s and was stopped"
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        return None, f"crashed ({name}); rebuild it for this CPU (see `make peers`)"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = ((done.stderr or "").strip().splitlines() or ["no output" if not show_progress else "see its output above"])
        return None, f"failed (exit {done.returncode}): {tail[-1][:200]}"
    try:
        result = json.loads(lines[-1])
    except ValueError:
        result = None
    if not isinstance(result, dict):
        return None, f"printed no result: {lines[-1][:200]}"
    return result, None


def run_peer(spec: dict, module: str = PEER_MODULE, timeout: float = PEER_TIMEOUT_S) -> PeerOutcome:
    """One timing peer in its own process; its failure is an outcome, never an exception."""
    result, error = run_child(spec, module, timeout)
    if error is not None:
        return PeerOutcome(error=error)
    try:
        return PeerOutcome(float(result["prefill_tps"]), float(result["decode_tps"]))
    except (KeyError, TypeError, ValueError):
        return PeerOutcome(error=f"printed no result: {json.dumps(result)[:200]}")


def llama_cpp_gguf(model_dir: Path) -> Path | None:
    """The GGUF llama.cpp runs for this model: when llama-cpp-python is installed and the model was
    converted from one (runtime/pack.py records the source)."""
    from partinfer.runtime.pack import gguf_source

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    return gguf_source(model_dir)


def bench_transformers(model_dir: Path, dtype: torch.dtype, device: str, prompt: list[int], new_tokens: int,
                       repeats: int) -> tuple[float, float]:
    """transformers `generate()` on the same weights and dtype: decode = (t(N tokens) - t(1 token)) / (N - 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    ids = torch.tensor([prompt], device=device)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.inference_mode():
        timed(new_tokens)  # warm-up
        first = statistics.median(timed(1) for _ in range(repeats))
        full = statistics.median(timed(new_tokens) for _ in range(repeats))
    return len(prompt) / first, (new_tokens - 1) / max(full - first, 1e-9)


def bench_llama_cpp(gguf: Path, prompt: list[int], new_tokens: int, repeats: int) -> tuple[float, float]:
    """llama.cpp (`llama-cpp-python`, an optional extra: the caller checks it is installed) on a GGUF file.

    Decode = (t(N tokens) - t(first token)) / (N - 1), greedy, the same thread count as torch.
    """
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=len(prompt) + new_tokens + 8, n_threads=torch.get_num_threads(),
                n_batch=max(len(prompt), 8), verbose=False)

    def timed() -> tuple[float, float]:
        # llama-cpp-python keeps the previous prompt cached even with reset=True (it reuses the longest
        # matching prefix), so without an explicit reset a timed prefill would be a cache hit.
        llm.reset()
        t0 = time.perf_counter()
        tokens = llm.generate(prompt, temp=0.0, reset=True)
        next(tokens)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            next(tokens)
        return len(prompt) / (t1 - t0), (new_tokens - 1) / (time.perf_counter() - t1)

    timed()  # warm-up
    runs = [timed() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def answer_llama_cpp(gguf: Path, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                     stop_when: str) -> list[list[int]]:
    """Greedy answers of llama.cpp to token-id prompts (the ones our runtime is given): new token ids per
    prompt, ending at a stop id, at `max_new_tokens`, or once the callable `stop_when` ("module:function"
    of the decoded text so far) says the answer is complete."""
    import importlib

    from llama_cpp import Llama
    from tqdm import tqdm

    module, function = stop_when.split(":")
    complete = getattr(importlib.import_module(module), function)
    longest = max(len(p) for p in prompts)
    llm = Llama(model_path=str(gguf), n_ctx=longest + max_new_tokens + 8, n_threads=torch.get_num_threads(),
                n_batch=min(longest, 512), verbose=False)
    answers = []
    for prompt in tqdm(prompts, desc="llama.cpp", unit="problem"):
        llm.reset()
        tokens: list[int] = []
        for token in llm.generate(prompt, temp=0.0, reset=True):
            tokens.append(int(token))
            if token in stop_ids or len(tokens) >= max_new_tokens or complete(
                    llm.detokenize(tokens).decode("utf-8", errors="ignore")):
                break
        answers.append(tokens)
    return answers


def run_spec(spec: dict) -> dict:
    """Inside the child: time the peer the spec names."""
    torch.set_num_threads(int(spec["threads"]))
    if spec["kind"] == "transformers":
        from partinfer.runtime.engine import parse_dtype

        pre, dec = bench_transformers(Path(spec["model"]), parse_dtype(spec["dtype"]), spec["device"], spec["prompt"],
                                      spec["new_tokens"], spec["repeats"])
    elif spec["kind"] == "llama.cpp":
        pre, dec = bench_llama_cpp(Path(spec["model"]), spec["prompt"], spec["new_tokens"], spec["repeats"])
    elif spec["kind"] == "llama.cpp answers":
        return {"answers": answer_llama_cpp(Path(spec["model"]), spec["prompts"], spec["max_new_tokens"],
                                            spec["stop_ids"], spec["stop_when"])}
    else:
        raise ValueError(f"unknown peer {spec['kind']!r}")
    return {"prefill_tps": pre, "decode_tps": dec}


if __name__ == "__main__":
    print(json.dumps(run_spec(json.loads(sys.stdin.read()))))
