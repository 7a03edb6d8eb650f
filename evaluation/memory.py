"""`partinfer memory`: resident memory of each configuration, each measured in a fresh process.

Why a fresh process per configuration: RSS only grows within a process (freed pages often stay),
and torch's code pages count as RssFile the first time a kernel runs. So every worker first imports
torch and runs the same kinds of kernels on a tiny model-shaped input, the prompt's GEMMs at the model's
shapes and one short generation on a one-layer random model (the baseline), then loads the
model (peak RSS during load = VmHWM), then generates a few tokens so that every loaded weight has
been read, and reports RssAnon and RssFile from /proc/self/status. Model memory = RSS - baseline.

The baseline also builds a one-layer model on the `meta` device, because that imports torch's meta
machinery (tens of MiB, docs/design.md §7) in any process that loads the way we do.

Expected bytes are the weights the configuration keeps: non-FFN + loaded FFN neurons, plus the
per-sequence compact copies that a batch with several active sets gathers (none at batch 1, where
selection reorders the loaded neurons in place).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from partinfer.common.errors import PartinferError
from partinfer.common.process_env import MKL_SETTINGS
from partinfer.runtime.process_memory import proc_status
from partinfer.runtime.sparsity import SparsityConfig

MIB = 2**20
DEFAULT_GAMMAS = (0.9, 0.8, 0.7, 0.5)


@dataclass(frozen=True)
class MemorySpec:
    """One configuration to measure."""

    name: str
    model_dir: str
    method: str = "dense"  # a runtime method, or "transformers" (the peer)
    sparsity: dict | None = None  # SparsityConfig.to_dict() of a runtime method, validated by the caller
    dtype: str = "bf16"
    device: str = "cpu"
    prompt_tokens: int = 32  # the prompt generated from (random ids)
    new_tokens: int = 16


def llama_cpp_worker(spec: MemorySpec) -> dict:
    """The llama.cpp peer (llama-cpp-python) on its GGUF: model memory = RSS after a short generation
    minus the interpreter's RSS before llama_cpp is imported."""
    import time

    baseline = proc_status()
    t0 = time.perf_counter()
    from llama_cpp import Llama

    llm = Llama(model_path=spec.model_dir, n_ctx=spec.prompt_tokens + spec.new_tokens + 16, n_threads=os.cpu_count() or 1,
                verbose=False)
    load_s = time.perf_counter() - t0
    after_load = proc_status()
    prompt = [100 + i % 1000 for i in range(spec.prompt_tokens)]
    for _, _token in zip(range(spec.new_tokens), llm.generate(prompt, temp=0.0)):
        pass
    after_gen = proc_status()
    size = Path(spec.model_dir).stat().st_size
    expected = {"non_ffn": None, "ffn_loaded": None, "compact": 0, "weights": size}
    return memory_row(spec, load_s, baseline, after_load, after_gen, expected)


def memory_row(spec: MemorySpec, load_s: float, baseline: dict, after_load: dict, after_gen: dict,
               expected: dict) -> dict:
    """One configuration's report: the /proc readings and model memory = RSS - baseline."""
    return {"name": spec.name, "method": spec.method, "gamma": (spec.sparsity or {}).get("gamma", 1.0),
            "phi": (spec.sparsity or {}).get("phi"), "load_s": load_s,
            "baseline": baseline, "after_load": after_load, "after_generate": after_gen, "expected_bytes": expected,
            "model_mib_after_load": after_load["VmRSS"] - baseline["VmRSS"],
            "model_mib": after_gen["VmRSS"] - baseline["VmRSS"],
            "peak_load_mib": after_load["VmHWM"] - baseline["VmRSS"],
            "peak_generate_mib": after_gen["VmHWM"] - baseline["VmRSS"]}


def run_worker(spec: MemorySpec) -> dict:
    """Runs inside the fresh process: baseline, load, generate, measure."""
    import time

    if spec.method == "llama.cpp":
        return llama_cpp_worker(spec)
    import torch

    from partinfer.runtime.engine import parse_dtype
    from partinfer.runtime.generate import generate
    from partinfer.runtime.config import ModelConfig
    from partinfer.runtime.native import cpu_kernels, gemv

    dtype = parse_dtype(spec.dtype)
    cfg = ModelConfig.from_dir(Path(spec.model_dir))
    # Baseline: the same kinds of kernels on tiny inputs, so torch's code pages are resident already.
    with torch.inference_mode():
        x = torch.randn(1, 4, cfg.dim, dtype=dtype)
        w = torch.randn(cfg.dim, cfg.dim, dtype=dtype)
        torch.nn.functional.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None])
        torch.bmm(x, w[None].transpose(1, 2)).float().topk(2)
        torch.nn.functional.silu(torch.nn.functional.linear(x.float(), w.float())).sum()
        torch.nn.functional.embedding(torch.tensor([[1]]), w)
        if dtype == torch.bfloat16 and cpu_kernels():  # the compiled decode kernels' library, too
            gemv(w, x[0, 0].float())
            if cfg.dim % 32 == 0:  # and its compact-row kernels and de-quantizer
                from partinfer.common.formats.blocks import BLOCK_FORMATS
                from partinfer.runtime.quant import dequantize

                for fmt in BLOCK_FORMATS.values():
                    if fmt.kernel is not None and fmt.quantize_blocks is not None:
                        rows = fmt.quantize(w)
                        gemv(rows, x[0, 0].float())
                        dequantize(rows, fmt, cfg.dim, dtype)
    # Building a module on the `meta` device imports torch's meta machinery once.
    from partinfer.runtime.loader import load_model
    from partinfer.runtime.model import Transformer
    from partinfer.runtime.sparse_ffn import SparseFFN

    with torch.device("meta"):
        Transformer(replace(cfg, n_layers=1, vocab_size=8, ffn_dim=8))
    warm_up_generation(cfg, dtype)
    warm_up_gemms(cfg, dtype, prompt_chunk_lengths(spec.prompt_tokens))  # at both pass lengths a model may take
    baseline = proc_status()
    t0 = time.perf_counter()
    prompt = torch.randint(100, cfg.vocab_size - 100, (spec.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    if spec.method == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=dtype).to(spec.device).eval()
        load_s = time.perf_counter() - t0
        after_load = proc_status()
        ids = torch.tensor([prompt], device=spec.device)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec.new_tokens,
                           min_new_tokens=spec.new_tokens, do_sample=False, pad_token_id=0)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        expected = {"non_ffn": None, "ffn_loaded": None, "compact": 0, "weights": weights}
    else:
        sparsity = SparsityConfig.from_dict(spec.sparsity or {"method": "dense"})
        model = load_model(Path(spec.model_dir), dtype, spec.device, sparsity)
        load_s = time.perf_counter() - t0
        after_load = proc_status()
        generate(model, [prompt], spec.new_tokens)
        if spec.device.startswith("cuda"):
            torch.cuda.synchronize()
        expected = expected_bytes(model, SparseFFN)
    after_gen = proc_status()
    cuda = {}
    if spec.device.startswith("cuda"):
        cuda = {"cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / MIB,
                "cuda_allocated_mib": torch.cuda.memory_allocated() / MIB}
    return {**cuda, **memory_row(spec, load_s, baseline, after_load, after_gen, expected)}


def warm_up_generation(cfg, dtype) -> None:
    """One short generation on a one-layer random model of the real model's width, then freed: what a
    first generation sets up once per process (thread pools and their heaps, GEMM and attention kernels'
    state, the decode backend's code pages: ~4 MiB of heap and ~2 MiB of code on the default model, the
    same for any model) lands in the baseline instead of in the first model's memory."""
    import torch

    from partinfer.runtime.decode import choose_backend
    from partinfer.runtime.generate import generate
    from partinfer.runtime.model import Transformer
    from partinfer.runtime.process_memory import release_free_heap

    tiny_cfg = replace(cfg, n_layers=1, vocab_size=256, ffn_dim=64, tie_embeddings=True)
    tiny = Transformer(tiny_cfg)
    with torch.no_grad():
        for p in tiny.parameters():
            p.normal_(0, 0.02)
    tiny = tiny.to(dtype).eval()
    tiny.init_buffers("cpu")
    tiny.backend = choose_backend(tiny)
    generate(tiny, [list(range(1, 33))], 4)
    del tiny
    release_free_heap()


def prompt_chunk_lengths(prompt_tokens: int) -> list[int]:
    """The token counts of the chunks `prefill` may run a prompt of this length in: at the float
    weights' pass length and at the compact prompt products' (`Transformer.prefill_chunk_tokens`)."""
    from partinfer.runtime.kernels import K_PRODUCT_TOKENS
    from partinfer.runtime.model import PREFILL_CHUNK_TOKENS

    lengths = set()
    for chunk in (PREFILL_CHUNK_TOKENS, K_PRODUCT_TOKENS):
        full, rest = divmod(prompt_tokens, chunk)
        lengths |= ({chunk} if full else set()) | ({rest} if rest else set())
    return sorted(lengths)


def warm_up_gemms(cfg, dtype, chunk_lengths: list[int]) -> None:
    """The prompt's float GEMMs at their shapes (x [tokens, k], for each prompt chunk's length, times
    every weight shape a layer has, as stored and transposed: attention, gate, up, fused gate/up, down
    columns): the GEMM library keeps state per shape on first use (~2.5 MiB on the default model), the
    process's and not the model's."""
    import torch
    import torch.nn.functional as F

    from partinfer.runtime.process_memory import release_free_heap

    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {(q + 2 * kv, cfg.dim), (q, cfg.dim), (kv, cfg.dim), (cfg.dim, q), (cfg.ffn_dim, cfg.dim),
              (2 * cfg.ffn_dim, cfg.dim), (cfg.dim, cfg.ffn_dim)}
    with torch.inference_mode():
        for (n, k), tokens in itertools.product(sorted(shapes), chunk_lengths):
            x = torch.randn(1, tokens, k, dtype=dtype)
            F.linear(x, torch.randn(n, k, dtype=dtype))
            F.linear(x, torch.randn(k, n, dtype=dtype).t())
    release_free_heap()


def expected_bytes(model, sparse_cls) -> dict:
    """Weights kept by a runtime model: non-FFN, loaded FFN, and compact active copies."""
    ffn = non_ffn = compact = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if ".mlp." in name:
            ffn += size
        else:
            non_ffn += size
    for m in model.modules():
        if isinstance(m, sparse_cls) and m.c_gate_up is not None:
            compact += (m.c_gate_up.numel() + m.c_down.numel()) * m.c_gate_up.element_size()
    return {"non_ffn": non_ffn, "ffn_loaded": ffn, "compact": compact, "weights": non_ffn + ffn + compact}


# glibc raises its mmap threshold after large frees, after which freed transients (prefill activations,
# fp32 weight upcasts) stay in the heap and count as RSS. A fixed threshold returns them to the system;
# every worker, the transformers peer included, runs with it, and with the MKL settings the command line
# runs with (common/process_env.py).
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), **MKL_SETTINGS}


def measure(spec: MemorySpec) -> dict:
    """Run one configuration in a fresh interpreter and return its report."""
    done = subprocess.run([sys.executable, "-m", "partinfer.evaluation.memory", json.dumps(spec.__dict__)],
                          capture_output=True, text=True, env={**os.environ, **WORKER_ENV})
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise PartinferError(f"memory worker for {spec.name} failed: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_memory(model_dir: Path, sparsity: SparsityConfig, gammas=DEFAULT_GAMMAS, methods=("load-only", "partinfer"),
               dtype: str = "bf16", device: str = "cpu", packed: bool = True, peers: bool = True,
               progress=None, weights: str | None = None, prompt_tokens: int = 32, new_tokens: int = 16) -> dict:
    """Measure dense, each method at each γ (the rest of `sparsity` as given, φ and δ at most γ), and the transformers peer;
    one fresh process each, all on the weight scheme `weights` (None: bf16), generating `new_tokens`
    after a `prompt_tokens` prompt. Every configuration is validated here, before the first worker starts."""
    from partinfer.evaluation.peers import llama_cpp_gguf
    from partinfer.runtime.pack import cached_pack

    weights = weights or "bf16"
    compact = weights != "bf16"
    if (methods or compact) and sparsity.model_neurons is None:
        raise PartinferError("sparse methods and --weights need --model-neurons FILE (a model-level neuron file)")
    if compact and not packed:
        raise PartinferError(f"--weights {weights} is read from a packed copy; drop --plain")
    source = cached_pack(model_dir, sparsity.model_neurons, weights).path if packed and (methods or compact) else model_dir
    lengths = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens}
    specs = [MemorySpec(f"dense {weights}" if compact else "dense", str(source if compact else model_dir), "dense",
                        dtype=dtype, device=device, **lengths)]
    for method in methods:
        for g in gammas:
            # what stays resident depends on γ alone: a φ or δ above a swept γ (a model's default φ 0.9
            # against γ 0.7) is held at γ for that row rather than refusing the sweep
            config = replace(sparsity, method=method, gamma=g, phi=min(sparsity.phi, g), delta=min(sparsity.delta, g))
            specs.append(MemorySpec(f"{method} γ={g}", str(source), method, config.to_dict(), dtype, device, **lengths))
    if peers:
        specs.append(MemorySpec("transformers", str(model_dir), "transformers", dtype=dtype, device=device, **lengths))
        gguf = llama_cpp_gguf(model_dir)  # the GGUF `partinfer prepare` converted it from, when it is still there
        if gguf is not None and device.startswith("cpu"):
            specs.append(MemorySpec(f"llama.cpp ({gguf.name})", str(gguf), "llama.cpp", device=device, **lengths))
    rows = []
    for spec in specs:
        if progress:
            progress(spec.name)
        rows.append(measure(spec))
    return {"model": str(model_dir), "packed": packed, "dtype": dtype, "weights": weights, "rows": rows, **lengths,
            "ffn_layer_mib": ffn_layer_bytes(source, dtype) / MIB, "kv_cache_mib": kv_cache_mib(model_dir, dtype, lengths)}


def kv_cache_mib(model_dir: Path, dtype: str, lengths: dict) -> float:
    """Our runtime's KV cache for one sequence of the measured context (prompt + new tokens), which the
    peak during generation holds and the model memory (measured after it) does not."""
    from partinfer.runtime.config import ModelConfig
    from partinfer.runtime.model import KVCache

    context = lengths["prompt_tokens"] + lengths["new_tokens"]
    element = 4 if dtype in ("fp32", "float32") else 2
    return KVCache.nbytes(ModelConfig.from_dir(Path(model_dir)), 1, context, element) / MIB


def ffn_layer_bytes(model_dir: Path, dtype: str) -> int:
    """One FFN layer's weights as the checkpoint's format keeps them (layer 0's formats)."""
    from partinfer.common.formats.pack_format import PackManifest, matrix_name
    from partinfer.runtime.config import ModelConfig

    cfg = ModelConfig.from_dir(Path(model_dir))
    manifest = PackManifest.read(Path(model_dir))
    gate_up = None if manifest is None else manifest.format_of(matrix_name(0, "gate_proj"))
    if gate_up is not None:
        down = manifest.format_of(matrix_name(0, "down_proj"))
        table = cfg.ffn_dim // down.block * down.head_bytes * cfg.dim  # the down blocks' heads
        return cfg.ffn_dim * (2 * gate_up.row_bytes(cfg.dim) + down.column_code_bytes(cfg.dim)) + table
    return 3 * cfg.dim * cfg.ffn_dim * (4 if dtype in ("fp32", "float32") else 2)


def format_memory(report: dict) -> str:
    lines = [f"model {report['model']} ({report['dtype']}, {report.get('weights', 'bf16')} weights, "
             f"{'packed' if report['packed'] else 'plain'} checkpoint for sparse rows, {report.get('prompt_tokens', 32)}-token "
             f"prompt + {report.get('new_tokens', 16)} new); "
             "MiB; model = RSS - baseline (fresh process: interpreter + torch + its kernels warmed up, no model)",
             f"{'configuration':<22}{'expected':>9}{'model':>8}{'vs exp':>8}{'peak load':>10}{'peak gen':>9}"
             f"{'RssAnon':>9}{'RssFile':>9}{'baseline':>9}"]
    for r in report["rows"]:
        exp = r["expected_bytes"]["weights"] / MIB
        lines.append(
            f"{r['name']:<22}{exp:>9.1f}{r['model_mib']:>8.1f}{r['model_mib'] / exp - 1:>+8.1%}{r['peak_load_mib']:>10.1f}"
            f"{r['peak_generate_mib']:>9.1f}{r['after_generate']['RssAnon']:>9.1f}{r['after_generate']['RssFile']:>9.1f}"
            f"{r['baseline']['VmRSS']:>9.1f}"
        )
    for r in report["rows"]:
        if "cuda_max_allocated_mib" in r:
            lines.append(f"{r['name']}: torch.cuda.max_memory_allocated {r['cuda_max_allocated_mib']:.1f} MiB")
    lines.append(f"one FFN layer = {report['ffn_layer_mib']:.1f} MiB; expected = non-FFN + loaded FFN (+ per-sequence copies in batches)")
    if "kv_cache_mib" in report:
        lines.append(f"peak gen includes our KV cache of the context, {report['kv_cache_mib']:.1f} MiB")
    peer = next((r for r in report["rows"] if r["method"] == "llama.cpp"), None)
    if peer is not None:
        ratios = ", ".join(f"{r['name']} {r['model_mib'] / peer['model_mib']:.2f}x" for r in report["rows"] if r is not peer)
        lines.append(f"model memory vs llama.cpp ({peer['model_mib']:.1f} MiB; expected = its GGUF file): {ratios}")
    return "\n".join(lines)


def plot_memory(report: dict, out: Path) -> Path:
    """Measured and expected model memory against γ per method, dense and the peer as lines (a new
    path, or an earlier `memory` plot: common.output_file)."""
    from partinfer.common.output_file import check_output_file
    from partinfer.profiler.plotting import png_axes

    check_output_file(out, "memory")
    with png_axes(out, "memory", "γ (fraction of FFN neurons loaded)", "model memory (MiB, RSS - baseline)", 7) as ax:
        methods = sorted({r["method"] for r in report["rows"] if r["method"] not in ("dense", "transformers", "llama.cpp")})
        for method in methods:
            rows = sorted((r for r in report["rows"] if r["method"] == method), key=lambda r: r["gamma"])
            g = [r["gamma"] for r in rows]
            line, = ax.plot(g, [r["model_mib"] for r in rows], "o-", label=f"{method} measured")
            ax.plot(g, [r["expected_bytes"]["weights"] / MIB for r in rows], "x--", color=line.get_color(),
                    label=f"{method} expected")
        for r in report["rows"]:
            if r["method"] in ("dense", "transformers", "llama.cpp"):
                ax.axhline(r["model_mib"], ls=":", color={"dense": "k", "transformers": "r"}.get(r["method"], "g"),
                           label=f"{r['name']} measured")
    return Path(out)


if __name__ == "__main__":
    print(json.dumps(run_worker(MemorySpec(**json.loads(sys.argv[1])))))
