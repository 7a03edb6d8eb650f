"""The bench's peers, each run in a child process: transformers `generate()` on the same weights and
llama.cpp (llama-cpp-python, an optional extra) on the GGUF the model was converted from.

A peer is outside our control (a llama.cpp build can trap on an instruction the CPU advertises but
the VM forbids: AMX, seen as SIGILL), so `run_peer` starts `python -m <module> <spec>` and reads one
JSON line back; a child that dies by a signal, exits non-zero or runs past its time becomes an
outcome with a one-line `error`, and the bench prints the rest of its table.
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
    from partinfer.runtime.pack import gguf_source

    common = {"prompt": prompt, "new_tokens": new_tokens, "repeats": repeats, "threads": torch.get_num_threads()}
    specs = [("transformers generate()", {"kind": "transformers", "model": str(model_dir), "dtype": dtype,
                                          "device": device, **common}, None)]
    gguf = gguf_source(model_dir)
    if gguf is not None and importlib.util.find_spec("llama_cpp") is not None and device.startswith("cpu"):
        specs.append((f"llama.cpp ({gguf.name})", {"kind": "llama.cpp", "model": str(gguf), **common},
                      gguf.stat().st_size))
    return specs


def run_peer(spec: dict, module: str = PEER_MODULE, timeout: float = PEER_TIMEOUT_S) -> PeerOutcome:
    """One peer in a fresh interpreter; its failure is an outcome, never an exception."""
    try:
        done = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 1))})
    except subprocess.TimeoutExpired:
        return PeerOutcome(error=f"ran past {timeout:.0f} s and was stopped")
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        return PeerOutcome(error=f"crashed ({name}); rebuild it for this CPU (see `make peers`)")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return PeerOutcome(error=f"failed (exit {done.returncode}): {tail}")
    try:
        result = json.loads(lines[-1])
        return PeerOutcome(float(result["prefill_tps"]), float(result["decode_tps"]))
    except (ValueError, KeyError, TypeError):
        return PeerOutcome(error=f"printed no result: {lines[-1][:200]}")


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


def run_spec(spec: dict) -> dict:
    """Inside the child: time the peer the spec names."""
    torch.set_num_threads(int(spec["threads"]))
    if spec["kind"] == "transformers":
        from partinfer.runtime.engine import parse_dtype

        pre, dec = bench_transformers(Path(spec["model"]), parse_dtype(spec["dtype"]), spec["device"], spec["prompt"],
                                      spec["new_tokens"], spec["repeats"])
    elif spec["kind"] == "llama.cpp":
        pre, dec = bench_llama_cpp(Path(spec["model"]), spec["prompt"], spec["new_tokens"], spec["repeats"])
    else:
        raise ValueError(f"unknown peer {spec['kind']!r}")
    return {"prefill_tps": pre, "decode_tps": dec}


if __name__ == "__main__":
    print(json.dumps(run_spec(json.loads(sys.argv[1]))))
