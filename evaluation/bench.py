"""Speed benchmark: our decode vs transformers `generate()` and the memory-bandwidth floor, in one run.

Batch-1 decode is memory-bound: every token reads every weight it uses once, so
tokens/s <= bandwidth / bytes-per-token. We print the measured rate, that floor and the share.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import asdict, dataclass, field, replace

import torch

from partinfer.evaluation.peers import PEER_MODULE, peer_specs, run_peer
from partinfer.runtime.engine import parse_device, parse_dtype
from partinfer.runtime.generate import generate
from partinfer.runtime.loader import load_model
from partinfer.runtime.model import Transformer
from partinfer.runtime.native import compact_kernel_path, cpu_kernels
from partinfer.runtime.prepare import resolve_model
from partinfer.runtime.sparsity import SparsityConfig


@dataclass
class BenchRow:
    name: str
    prefill_tps: float
    decode_tps: float
    bytes_per_token: int
    bandwidth_gbs: float  # the copy tests around this row's runs
    floor_tps: float
    note: str | None = None  # a peer that gave no numbers: what happened (its speeds are 0)
    decode_rounds: list[float] = field(default_factory=list)  # decode tok/s of each round (0: no numbers that round)

    @property
    def share_of_floor(self) -> float:
        return self.decode_tps / self.floor_tps if self.floor_tps else 0.0


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` timed calls of fn after one warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_bandwidth(n_bytes: int = 256 << 20, repeats: int = 5, device: str = "cpu") -> float:
    """Bytes moved per second (read + write) by a large tensor copy; the machine's practical limit."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return 2 * n_bytes / best_time(copy, repeats)


def measure_gemv_rate(cols: int, n_bytes: int = 256 << 20, repeats: int = 5) -> float | None:
    """Weight bytes per second that our compiled bf16 GEMV streams through one large [n, cols] matrix:
    what a CPU decode step could reach if it were nothing but weight streaming. A GEMV only reads,
    while the copy figure counts reads and writes, so this, not the floor, is the practical ceiling of
    a decode's share of the floor. None where the compiled kernels are unavailable."""
    from partinfer.runtime.native import gemv

    if not cpu_kernels():
        return None
    weights = torch.ones(n_bytes // (2 * cols), cols, dtype=torch.bfloat16)
    x = torch.ones(cols)
    return weights.numel() * weights.element_size() / best_time(lambda: gemv(weights, x), repeats)


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one batch-1 decode step reads.

    Every non-FFN weight once (a tied embedding once, as the head; an untied input embedding only
    reads one row, so it is not counted); per FFN layer, all its weights, or for a sparse layer
    only its active neurons (φ of the layer; all loaded ones for load-only).
    """
    from partinfer.runtime.sparse_ffn import is_sparse

    total = 0
    for name, p in model.named_parameters():
        if ".mlp." in name or (name.startswith("embed_tokens") and model.lm_head is not None):
            continue
        total += p.numel() * p.element_size()
    for block in model.layers:
        ffn = block.mlp
        if is_sparse(ffn):
            total += ffn.decode_bytes()
        else:
            total += sum(p.numel() * p.element_size() for p in ffn.parameters())
    return total


def floor_tps(bandwidth: float, bytes_per_token: int) -> float:
    return bandwidth / bytes_per_token if bytes_per_token else 0.0


def row_bandwidth(copies: list[float], i: int) -> float:
    """Bandwidth for row i of a run: the mean of the copy tests just before (copies[i]) and just after
    (copies[i + 1]) its timed runs."""
    return (copies[i] + copies[i + 1]) / 2


def bench_ours(model: Transformer, prompt: list[int], new_tokens: int, repeats: int) -> tuple[float, float]:
    """Median prefill and decode tokens/s of our runtime after one warm-up run."""
    runs = [generate(model, [prompt], new_tokens) for _ in range(repeats + 1)][1:]
    return statistics.median(r.prefill_tps for r in runs), statistics.median(r.decode_tps for r in runs)


def run_bench(
    model: str | None = None, methods: tuple[str, ...] = ("dense", "partinfer"), sparsity: SparsityConfig | None = None,
    dtype: str = "bf16", device: str = "cpu", prompt_len: int = 64, new_tokens: int = 64, repeats: int = 3,
    peers: bool = True, weights: str | None = None, peer_module: str = PEER_MODULE, rounds: int = 1,
) -> dict:
    """Measure every method and the peers in one process, on the same prompt, and return a JSON-able
    report; `weights`: the weight scheme every method runs on (None: as stored). Each peer runs in a
    child process (`peer_module`, evaluation/peers.py): one that fails or crashes becomes a row that
    says so, and the others are still measured.

    `rounds`: time every row, in order, that many times over. A shared machine's speed moves in phases
    of seconds to minutes, and a peer timed once after all our rows can land in another phase than
    they did; each round times all rows within a few minutes, so a ratio taken within a round compares
    rows under the same conditions. Rows show the median over rounds, `decode_rounds` each round's."""
    sparsity = sparsity or SparsityConfig()
    model_dir = resolve_model(model)
    torch_dtype, device = parse_dtype(dtype), parse_device(device)
    dense = load_model(model_dir, torch_dtype, device, replace(sparsity, method="dense"), weights)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(min(100, dense.cfg.vocab_size // 4), dense.cfg.vocab_size - 1, (prompt_len,), generator=g).tolist()
    on_cpu_bf16 = device.startswith("cpu") and torch_dtype == torch.bfloat16
    gemv_rate = measure_gemv_rate(max(dense.cfg.dim, 256)) if on_cpu_bf16 else None  # model width; tiny test models: 256
    specs = peer_specs(model_dir, dtype, device, prompt, new_tokens, repeats) if peers else []
    dense_bytes = weight_bytes_per_token(dense)  # the peers' rows read what dense reads (unless they say)

    def load(method: str) -> Transformer:
        return dense if method == "dense" else load_model(model_dir, torch_dtype, device, replace(sparsity, method=method), weights)

    all_copies: list[list[float]] = []
    measured = [bench_round(methods, load, prompt, new_tokens, repeats, specs, dense_bytes, peer_module, device,
                            all_copies)
                for _ in range(rounds)]
    rows = [combine_rounds([one[i] for one in measured]) for i in range(len(measured[0]))]
    copies = [c for one in all_copies for c in one]
    return {
        "model": str(model_dir), "dtype": dtype, "device": device, "threads": torch.get_num_threads(),
        "weights": weights or "as stored",
        "decode_kernels": (f"compiled AVX2 GEMV, compact rows: {compact_kernel_path()}" if on_cpu_bf16 and cpu_kernels()
                           else "stock PyTorch, one CUDA graph per step" if device.startswith("cuda") else "stock PyTorch"),
        "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats, "rounds": rounds,
        "bandwidth_gbs": statistics.median(copies) / 1e9, "bandwidth_copies_gbs": [c / 1e9 for c in copies],
        "gemv_gbs": None if gemv_rate is None else gemv_rate / 1e9,
        "gamma": sparsity.gamma, "delta": sparsity.delta, "phi": sparsity.phi, "token_score": sparsity.token_score,
        "rows": [asdict(r) | {"share_of_floor": r.share_of_floor} for r in rows],
    }


def bench_round(methods: tuple[str, ...], load: Callable[[str], Transformer], prompt: list[int], new_tokens: int,
                repeats: int, specs: list[tuple[str, dict, int | None]], dense_bytes: int, peer_module: str,
                device: str, all_copies: list[list[float]]) -> list[BenchRow]:
    """One round: every method, then every peer, each between two copy tests (appended to all_copies as
    this round's list: one before each row and one at the end)."""
    # The memory bandwidth of a shared machine moves in phases lasting seconds (docs/design.md §7), so
    # each row's floor comes from copy tests taken just before and just after its own timed runs.
    copies: list[float] = []
    timed = []  # (name, prefill tok/s, decode tok/s, bytes per token, why a peer gave no numbers)
    for method in methods:
        m = load(method)
        copies.append(measure_bandwidth(device=device))
        pre, dec = bench_ours(m, prompt, new_tokens, repeats)
        timed.append((method, pre, dec, weight_bytes_per_token(m), None))  # bytes after a generation: active sets held
        del m
    for name, spec, nbytes in specs:
        copies.append(measure_bandwidth(device=device))
        outcome = run_peer(spec, peer_module)  # its own process: a peer that crashes takes only its row
        timed.append((name, outcome.prefill_tps, outcome.decode_tps, nbytes or dense_bytes, outcome.error))
    copies.append(measure_bandwidth(device=device))
    all_copies.append(copies)
    rows = []
    for i, (name, pre, dec, nbytes, note) in enumerate(timed):
        bandwidth = row_bandwidth(copies, i)
        rows.append(BenchRow(name, pre, dec, nbytes, bandwidth / 1e9, floor_tps(bandwidth, nbytes), note, [dec]))
    return rows


def combine_rounds(rounds: list[BenchRow]) -> BenchRow:
    """One row's rounds as one row: the medians of the rounds that gave numbers (all of them for our
    methods), each round's decode kept; a peer that failed in every round keeps its first reason."""
    ok = [r for r in rounds if r.note is None] or rounds[:1]
    bandwidth = statistics.median(r.bandwidth_gbs for r in ok)
    first = rounds[0]
    return BenchRow(first.name, statistics.median(r.prefill_tps for r in ok), statistics.median(r.decode_tps for r in ok),
                    first.bytes_per_token, bandwidth, floor_tps(bandwidth * 1e9, first.bytes_per_token), ok[0].note,
                    [r.decode_tps for r in rounds])


def name_width(rows: list[dict]) -> int:
    """The name column's width: the longest row name (a peer's names its file) and two spaces."""
    return max(26, *(len(r["name"]) + 2 for r in rows))


def format_bench(report: dict) -> str:
    w = name_width(report["rows"])
    lines = [
        f"model {report['model']}  {report['dtype']} ({report.get('weights', 'as stored')} weights) on {report['device']} ({report['threads']} threads), "
        f"prompt {report['prompt_len']}, {report['new_tokens']} new tokens, median of {report['repeats']}, "
        f"decode kernels: {report.get('decode_kernels', 'stock PyTorch')}",
        f"memory bandwidth (copy, read+write) {min(report['bandwidth_copies_gbs']):.1f}-"
        f"{max(report['bandwidth_copies_gbs']):.1f} GB/s over {len(report['bandwidth_copies_gbs'])} copy tests, median "
        f"{report['bandwidth_gbs']:.1f}; each row's floor uses the tests just before and after its runs"
        + (f"; our bf16 GEMV alone streams {report['gemv_gbs']:.1f} GB/s ({report['gemv_gbs'] / report['bandwidth_gbs']:.0%})"
           if report.get("gemv_gbs") else ""),
        f"{'method':<{w}}{'prefill tok/s':>14}{'decode tok/s':>14}{'MB/token':>10}{'copy GB/s':>11}{'floor tok/s':>13}{'of floor':>10}"
        f"{'vs dense':>10}{'ideal':>8}{'of ideal':>10}",
    ]
    first = report["rows"][0]
    for r in report["rows"]:
        if r.get("note"):
            lines.append(f"{r['name']:<{w}}{'':>14}{'':>14}{r['bytes_per_token'] / 1e6:>10.1f}  no result: {r['note']}")
            continue
        ratio = r["decode_tps"] / first["decode_tps"]
        ideal = first["bytes_per_token"] / r["bytes_per_token"]
        lines.append(
            f"{r['name']:<{w}}{r['prefill_tps']:>14.1f}{r['decode_tps']:>14.1f}{r['bytes_per_token'] / 1e6:>10.1f}"
            f"{r['bandwidth_gbs']:>11.1f}{r['floor_tps']:>13.1f}{r['share_of_floor']:>9.0%}{ratio:>9.2f}x{ideal:>7.2f}x{ratio / ideal:>9.0%}"
        )
    lines.append(f"γ {report['gamma']}, δ {report['delta']}, φ {report['phi']}, tokenwise ranking "
                 f"{report.get('token_score', 'not recorded')}; ideal = dense bytes/token ÷ method bytes/token")
    if report.get("rounds", 1) > 1:
        lines += format_rounds(report["rows"])
    return "\n".join(lines)


def format_rounds(rows: list[dict]) -> list[str]:
    """Each round's decode tok/s per row and, where llama.cpp has a row, each row's ratio to llama.cpp's
    decode in the same round and the median of those ratios."""
    n = len(rows[0]["decode_rounds"])
    peer = next((r for r in rows if r["name"].startswith("llama.cpp")), None)
    w = name_width(rows)
    head = f"{'decode tok/s by round':<{w}}" + "".join(f"{i + 1:>8}" for i in range(n))
    lines = [head + (f"{'× llama.cpp, by round':>{8 * n + 4}}{'median':>9}" if peer else "")]
    for r in rows:
        line = f"{r['name']:<{w}}" + "".join(f"{d:>8.1f}" for d in r["decode_rounds"])
        if peer is not None:
            ratios = [d / p for d, p in zip(r["decode_rounds"], peer["decode_rounds"]) if d and p]
            line += "    " + "".join(f"{x:>7.2f}x" for x in ratios) + (f"{statistics.median(ratios):>8.2f}x" if ratios else "")
        lines.append(line)
    return lines
