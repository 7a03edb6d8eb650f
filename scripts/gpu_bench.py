"""GPU decode benchmark on a Llama-3.1-8B-shaped model with random bf16 weights (docs/benchmarks.md).

Run from the repository root on a machine with a CUDA GPU; the model is built there (~16 GB of
weights, written once under --out and reused), then profiled on random prompts for its neuron file:

    python -m scripts.gpu_bench --out /tmp/partinfer-8b [--shape llama-3.1-8b] [--json report.json]

Prints `partinfer bench`'s table: dense and partinfer (γ 0.7, δ 0.3, φ 0.4) with CUDA-graph decode,
transformers `generate()` beside them, each against the GPU's copy-bandwidth floor.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from partinfer.evaluation.bench import format_bench, run_bench
from partinfer.evaluation.synthetic_model import SHAPES, profile_random_model, save_random_llama
from partinfer.runtime.sparsity import SparsityConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the random model and its neuron file go")
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default="dense,partinfer")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    model_dir = save_random_llama(args.out / args.shape, args.shape, device=args.device)
    neurons = args.out / f"{args.shape}-neurons.safetensors"
    if not neurons.is_file():
        profile_random_model(model_dir, neurons, device=args.device)
    report = run_bench(str(model_dir), tuple(args.methods.split(",")), SparsityConfig(model_neurons=neurons),
                       device=args.device, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       repeats=args.repeats)
    print(format_bench(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
