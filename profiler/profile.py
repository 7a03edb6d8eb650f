"""`partinfer profile`: run data sets through the dense model and write neuron files.

For every data set: prompts (truncated to their last `max_prompt_tokens`) in left-padded batches,
then `gen_tokens` greedily generated tokens (PartInfer profiles the prompt plus what the model
generates, because decode is where the neurons are used). One dataset-level file per data set,
and a model-level file that merges them (sums add, so it equals one run over the mixture).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from partinfer.common.data import load_texts
from partinfer.common.neuron_file import NeuronFile, down_norms, merge
from partinfer.profiler.distributed import SINGLE, Ranks, all_reduce_stats, shard_by_tokens, together
from partinfer.profiler.stats import ActivationStats, attach_recorders, detach_recorders
from partinfer.runtime.engine import Engine
from partinfer.common.errors import PartinferError
from partinfer.runtime.generate import left_pad
from partinfer.runtime.model import KVCache, Transformer, decode_step, prefill
from partinfer.common.output_dir import check_output_dir, replace_output_dir
from partinfer.runtime.selection import CORE_SCORES


RANK_BY = ("contribution", "mean_abs")


@dataclass(frozen=True)
class ProfileConfig:
    num_samples: int = 64
    gen_tokens: int = 32
    batch_size: int = 8
    max_prompt_tokens: int = 512
    token_sparsity: float = 0.2
    core_score: str = "abs"
    split: str = "profile"
    chat_template: bool = False
    rank_by: str = "contribution"  # or "mean_abs" (PartInfer's): see common/neuron_file.py

    def __post_init__(self) -> None:
        if self.rank_by not in RANK_BY:
            raise PartinferError(f"--rank-by must be one of {', '.join(RANK_BY)}, got {self.rank_by!r}")
        if self.num_samples < 1 or self.batch_size < 1 or self.max_prompt_tokens < 1:
            raise PartinferError("--num-samples, --batch-size and --max-prompt-tokens must be >= 1")
        if self.gen_tokens < 0:
            raise PartinferError("--gen-tokens must be >= 0")
        if not 0 < self.token_sparsity <= 1:
            raise PartinferError("--token-sparsity must be in (0, 1]")
        if self.core_score not in CORE_SCORES:
            raise PartinferError(f"--core-score must be one of {', '.join(CORE_SCORES)}")


@dataclass
class ProfileReport:
    files: dict[str, Path]  # data set name (or "model") -> written file
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def profile_texts(engine: Engine, texts: list[str], cfg: ProfileConfig, desc: str = "profile",
                  ranks: Ranks = SINGLE) -> ActivationStats:
    """Activation statistics of the dense model over `texts` (+ generated tokens). With several ranks,
    this rank profiles its shard and the returned statistics are the sum over all ranks."""
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0

    def own_shard() -> ActivationStats:
        prompts = [engine.encode(t, cfg.chat_template)[-cfg.max_prompt_tokens :] for t in texts]
        shard = [prompts[i] for i in shard_by_tokens([len(p) for p in prompts], ranks)]
        return profile_prompts(engine.model, shard, cfg, pad, desc, progress=ranks.is_main)

    return all_reduce_stats(together(ranks, own_shard), ranks)


@torch.inference_mode()
def profile_prompts(model: Transformer, prompts: list[list[int]], cfg: ProfileConfig, pad_id: int = 0,
                    desc: str = "profile", progress: bool = True) -> ActivationStats:
    """Statistics over token-id prompts, each followed by `cfg.gen_tokens` greedy tokens."""
    stats = ActivationStats(model.cfg.n_layers, model.cfg.ffn_dim, cfg.token_sparsity, cfg.core_score)
    attach_recorders(model, stats)
    try:
        with tqdm(total=len(prompts), desc=desc, unit="seq", disable=not progress) as bar:
            for start in range(0, len(prompts), cfg.batch_size):
                tokens, mask = left_pad(prompts[start : start + cfg.batch_size], pad_id)
                tokens, mask = tokens.to(model.device), mask.to(model.device)
                cache = KVCache(model.cfg, tokens.shape[0], tokens.shape[1] + cfg.gen_tokens, model.dtype, model.device)
                logits = prefill(model, tokens, cache, mask)[:, -1]  # padding does not count (prompt_chunk)
                for _ in range(cfg.gen_tokens):
                    logits = decode_step(model, logits.argmax(-1), cache)
                bar.update(tokens.shape[0])
                bar.set_postfix(tokens=stats.tokens)
    finally:
        detach_recorders(model)
    return stats


def to_neuron_file(stats: ActivationStats, model: Transformer, model_name: str, name: str, sequences: int,
                   cfg: ProfileConfig, level: str = "dataset") -> NeuronFile:
    """The neuron file of statistics that `model` (named `model_name`) gathered over data set `name`."""
    return NeuronFile(
        sum_abs=stats.sum_abs, core_count=stats.core_count, tokens=stats.tokens, model=model_name,
        fingerprint=model.cfg.fingerprint, level=level, datasets=(name,), sequences=sequences,
        gen_tokens=cfg.gen_tokens, token_sparsity=cfg.token_sparsity, core_score=cfg.core_score,
        dtype=str(model.dtype).removeprefix("torch."),
        down_norm=down_norms([block.mlp.down for block in model.layers]) if cfg.rank_by == "contribution" else None,
    )


def with_down_norms(neurons: NeuronFile, model_dir: Path) -> NeuronFile:
    """`neurons` ranked by contribution: the down norms read from a plain checkpoint's down weights
    (a file profiled before the norms were recorded). Sensitivities were measured with the old ranking,
    so they are dropped."""
    from dataclasses import replace

    from partinfer.common.formats.pack_format import matrix_name
    from partinfer.runtime.checkpoint import CheckpointReader

    with CheckpointReader(model_dir) as reader:
        names = [matrix_name(i, "down_proj") for i in range(neurons.n_layers)]
        missing = [n for n in names if n not in reader]
        if missing:
            raise PartinferError(f"{model_dir} holds no plain {missing[0]}; pass the original checkpoint, not a packed copy")
        norms = down_norms([reader.get(name) for name in names])
    return replace(neurons, down_norm=norms, sensitivity=None)


def dataset_file_name(name: str) -> str:
    """A file name for a data set name, a path or a hub id: dataset-<stem>.safetensors."""
    return "dataset-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).stem) + ".safetensors"


def profile_inputs(model_dir: Path, datasets: list[str]) -> tuple[Path, ...]:
    """What `--out` must never hold: the model and the local data files."""
    return (Path(model_dir), *(Path(name) for name in datasets if Path(name).exists()))


def run_profile(engine: Engine, datasets: list[str], out_dir: Path, cfg: ProfileConfig, ranks: Ranks = SINGLE,
                **data_options) -> ProfileReport:
    """Profile each data set, write dataset-level files and the model-level merge into `out_dir`.

    With several ranks (profiler.distributed) each profiles its shard of every data set; the files,
    written by rank 0 alone after the last all-reduce, equal a single process's up to summation order."""
    if not datasets:
        raise PartinferError("no data set given; pass --dataset (e.g. --dataset truthfulqa --dataset squad)")
    names = [dataset_file_name(name) for name in datasets]
    if len(set(names)) < len(names) or "model.safetensors" in names:
        raise PartinferError(f"data sets {', '.join(datasets)} would share an output file name; profile them in separate runs")
    inputs = profile_inputs(engine.model_dir, datasets)
    check_output_dir(out_dir, "profile", inputs)  # before the work, not after it
    texts = together(ranks, lambda: {name: load_texts(name, cfg.num_samples, cfg.split, **data_options) for name in datasets})
    t0 = time.perf_counter()
    per_dataset = []
    for name, items in texts.items():
        stats = profile_texts(engine, items, cfg, desc=name, ranks=ranks)
        per_dataset.append(to_neuron_file(stats, engine.model, engine.model_dir.name, name, len(items), cfg))
    seconds = time.perf_counter() - t0
    if ranks.is_main:
        with replace_output_dir(out_dir, "profile", inputs) as tmp:
            for name, nf in zip(datasets, per_dataset):
                nf.save(tmp / dataset_file_name(name))
            merge(per_dataset, level="model").save(tmp / "model.safetensors")
    files = {name: Path(out_dir) / file for name, file in zip(datasets, names)} | {"model": Path(out_dir) / "model.safetensors"}
    return ProfileReport(files, sum(f.tokens for f in per_dataset), seconds)
