"""`partinfer eval`: lm-eval per method on the offline tasks, raw results and a task × method table.

Each method runs lm-eval once through the `partinfer` model (evaluation/lm_eval_adapter.py) on the
tasks under evaluation/tasks/ (the eval split of the built-in data; the shipped neuron files come
from the profile split). Other lm-eval task names (`truthfulqa_gen`, `triviaqa`, `squadv2`, ...) are
passed through to lm-eval's own registry and need the hub. A method's raw results are written as
soon as it finishes and reused by a later run with the same settings, so a long evaluation resumes;
HumanEval's answers are also kept one by one as they come (evaluation/answer_journal.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from partinfer.common.errors import PartinferError, disk_full_cause
from partinfer.common.files import read_json
from partinfer.common.integrity import file_sha256
from partinfer.common.output_dir import IncrementalOutput
from partinfer.evaluation import humaneval
from partinfer.evaluation.answer_journal import AnswerJournal
from partinfer.evaluation.peers import llama_cpp_gguf
from partinfer.runtime.sparsity import METHODS, SparsityConfig

TASKS_DIR = Path(__file__).parent / "tasks"
OFFLINE_TASKS = {  # short name -> lm-eval task name of evaluation/tasks/*.yaml
    "truthfulqa_mc1": "partinfer_truthfulqa_mc1",
    "truthfulqa_mc2": "partinfer_truthfulqa_mc2",
    "squad": "partinfer_squad",
    "coqa": "partinfer_coqa",
    "xsum": "partinfer_xsum",
    "perplexity": "partinfer_perplexity",
}
# Tasks of our own, not lm-eval's: HumanEval (evaluation/humaneval.py, executed in evaluation/sandbox.py).
OWN_TASKS = (humaneval.TASK,)
METRICS = {  # lm-eval task -> metrics shown in the table (the first is the headline)
    "partinfer_truthfulqa_mc1": ("acc",),
    "partinfer_truthfulqa_mc2": ("acc",),
    "partinfer_squad": ("f1", "exact_match"),
    "partinfer_coqa": ("f1", "exact_match"),
    "partinfer_xsum": ("rougeL", "rouge1", "rouge2"),
    "partinfer_perplexity": ("word_perplexity",),
    "humaneval": ("pass@1",),
}
LLAMA_CPP = "llama.cpp"  # the peer's column (HumanEval only: it answers the same prompts on the GGUF)
LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte"}
# PartInfer paper (Llama-3.2-3B, γ 0.7, φ 0.4), score ÷ dense reference (docs/design.md, §6).
PUBLISHED_RATIOS = {
    "TriviaQA EM": {"load-only": 0.278 / 0.590, "partinfer": 0.045 / 0.590, "coreinfer": 0.085 / 0.590},
    "SQuAD v2": {"load-only": 26.4 / 31.0, "partinfer": 24.7 / 31.0, "coreinfer": 18.8 / 31.0},
    "WMT16 de-en BLEU": {"load-only": 34.9 / 39.5, "partinfer": 26.4 / 39.5, "coreinfer": 5.5 / 39.5},
    "XSum ROUGE": {"load-only": 0.206 / 0.253, "partinfer": 0.116 / 0.253, "coreinfer": 0.004 / 0.253},
}


def resolve_tasks(names: list[str]) -> list[str]:
    """Short offline names -> their lm-eval task names; our own tasks and any other name as they are."""
    if not names:
        raise PartinferError(f"no task given; offline tasks: {', '.join((*OFFLINE_TASKS, *OWN_TASKS))}")
    return [OFFLINE_TASKS.get(n, n) for n in names]


def _settings(model_dir: Path, method: str, sparsity: SparsityConfig, tasks: list[str], limit: int | None,
              dtype: str, include_path: Path | None = None, weights: str | None = None) -> dict:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(replace(sparsity, method=method)).items()}
    config["weights"] = weights  # a load option, recorded beside the sparsity settings as it always was
    if method != "tokenwise":
        del config["token_score"]  # only tokenwise reads it: other methods' results stay valid when it changes
    for optional in ("compensation", "weights"):
        if config.get(optional) is None:
            del config[optional]  # raw results from before these options existed stay reusable
    if config.get("budget") == "uniform":
        del config["budget"]
    settings = {"model": str(model_dir), "tasks": tasks, "limit": limit, "dtype": dtype, "sparsity": config}
    if method != "dense":  # a file edited in place is another setting; dense computes every neuron, whatever their order
        contents = {name: file_sha256(Path(config[name]))[:16] for name in ("model_neurons", "dataset_neurons", "compensation")
                    if config.get(name) and Path(config[name]).is_file()}
        if contents:
            settings["file_sha256"] = contents
    if include_path is not None:  # only when given: earlier raw results stay reusable
        settings["include_path"] = str(include_path)
    if humaneval.TASK in tasks:  # the answers depend on how the problems are asked
        settings["humaneval"] = humaneval.SETTINGS
    return settings


def task_data_error(e: Exception, include_path: Path | None) -> PartinferError | None:
    """Our one-line error for a failure to load a task's data, or None when `e` is not one (a bug: re-raised)."""
    where = f" in {include_path}" if include_path is not None else ""
    if isinstance(e, FileNotFoundError):  # a task YAML's data_files naming a file that is not there
        return PartinferError(f"a task's data file could not be found ({e}); fix the path in its task YAML{where}")
    full = disk_full_cause(e)
    if full is not None:
        return PartinferError(f"no space left on the disk while preparing a task's data ({full.strerror}); free some "
                              "disk space (or point HF_DATASETS_CACHE at a larger disk) and run again")
    if type(e).__module__.split(".")[0] in ("datasets", "huggingface_hub", "requests", "urllib3") or isinstance(e, OSError):
        return PartinferError(f"a task's data could not be loaded from the hub ({type(e).__name__}); "
                              f"upstream tasks need the hub, offline tasks: {', '.join(OFFLINE_TASKS)}")
    return None


def check_include_path(include_path: Path | None) -> None:
    if include_path is not None and not Path(include_path).is_dir():
        raise PartinferError(f"--include-path {include_path} is not a directory; pass a directory of lm-eval task YAMLs")


def task_manager(include_path: Path | None = None, tasks: list[str] | None = None):
    """lm-eval's TaskManager over our offline task YAMLs, plus a user's directory of task YAMLs
    (as `lm_eval --include_path` takes it). When `tasks` are all offline ones, lm-eval's own registry
    (thousands of YAMLs, most of the start-up time) is not indexed."""
    from lm_eval.tasks import TaskManager

    check_include_path(include_path)
    paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path is not None else [])
    offline_only = include_path is None and tasks is not None and set(tasks) <= set(OFFLINE_TASKS.values())
    return TaskManager(include_path=paths, include_defaults=not offline_only)


def run_method(model_dir: Path, method: str, sparsity: SparsityConfig, tasks: list[str], limit: int | None,
               dtype: str, device: str, batch_size: int, include_path: Path | None = None,
               weights: str | None = None, journal: AnswerJournal | None = None) -> dict:
    """Results for one method: {task: {metric: value}}, samples per task; HumanEval's samples and verdicts
    (its answers kept in `journal` as they come, when given)."""
    from partinfer.evaluation.lm_eval_adapter import PartinferLM

    lm = PartinferLM(model=str(model_dir), sparsity=replace(sparsity, method=method), dtype=dtype, device=device,
                     batch_size=batch_size, weights=weights)
    lm_tasks = [t for t in tasks if t not in OWN_TASKS]
    run = run_lm_eval(lm, lm_tasks, limit, include_path) if lm_tasks else {"results": {}, "samples": {}}
    if humaneval.TASK in tasks:
        code = humaneval.run_humaneval(lambda problems: humaneval.engine_answers(lm.engine, problems), limit, journal)
        run["results"].update(code["results"])
        run["samples"].update(code["samples"])
        run["humaneval_samples"] = code["humaneval_samples"]
    return run


def run_lm_eval(lm, tasks: list[str], limit: int | None, include_path: Path | None) -> dict:
    """lm-eval's results for a model on its tasks: {task: {metric: value}}, samples per task."""
    import lm_eval

    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, bootstrap_iters=1000,
                                      task_manager=task_manager(include_path, tasks), log_samples=False)
    except KeyError as e:  # lm-eval's way of saying a task name is unknown
        raise PartinferError(f"lm-eval does not know task {e}; offline tasks: {', '.join(OFFLINE_TASKS)}") from e
    except ImportError as e:  # a task YAML's `!function` names a module that cannot be imported
        where = f" from {include_path}" if include_path is not None else ""
        raise PartinferError(f"a task YAML{where} could not be loaded ({type(e).__name__}: {e}); fix its "
                             "`!function` module, which must sit beside the YAML") from e
    except Exception as e:
        error = task_data_error(e, include_path)
        if error is None:
            raise
        raise error from e
    results = {
        task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "," in k}
        for task, metrics in out["results"].items()
    }
    samples = {task: n.get("effective", n.get("original")) for task, n in out.get("n-samples", {}).items()}
    return {"results": results, "samples": samples}


def run_llama_cpp_humaneval(model_dir: Path, gguf: Path, limit: int | None) -> dict:
    """HumanEval answered by llama.cpp on the model's GGUF, in its own process, with the prompts (token ids)
    our runtime is given; scored by the same harness. A peer that fails is a run with an `error`."""
    import torch

    from partinfer.evaluation.peers import run_child
    from partinfer.runtime.text import load_tokenizer, stop_token_ids

    tokenizer = load_tokenizer(model_dir)
    problems = humaneval.load_problems(limit)
    spec = {"kind": "llama.cpp answers", "model": str(gguf), "prompts": humaneval.prompt_ids(tokenizer, problems),
            "max_new_tokens": humaneval.MAX_NEW_TOKENS, "stop_ids": sorted(stop_token_ids(tokenizer, model_dir)),
            "stop_when": "partinfer.evaluation.humaneval:answer_complete", "threads": torch.get_num_threads()}
    result, error = run_child(spec, show_progress=True)
    if error is not None:
        return {"results": {}, "samples": {}, "error": error}
    answers = [tokenizer.decode(ids, skip_special_tokens=True) for ids in result["answers"]]
    return humaneval.score(answers, problems)


def run_eval(
    model_dir: Path, tasks: list[str], methods: tuple[str, ...], sparsity: SparsityConfig, out_dir: Path,
    limit: int | None = None, dtype: str = "bf16", device: str = "cpu", batch_size: int = 1, resume: bool = True,
    table_only: bool = False, include_path: Path | None = None, weights: str | None = None, peers: bool = True,
) -> dict:
    """Evaluate every method; write out_dir/raw/<method>.json and out_dir/results.md; return the report.

    `include_path`: a directory of the user's own lm-eval task YAMLs, whose tasks `tasks` may name.
    `table_only`: run nothing; the table covers the methods whose raw results (same settings) exist.
    `peers`: with humaneval among the tasks, also llama.cpp on the model's GGUF (when installed and the
    model came from one), as a column beside the methods.
    """
    for m in methods:
        if m not in METHODS:
            raise PartinferError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    check_include_path(include_path)  # a missing directory fails here, before any output exists
    output = IncrementalOutput(out_dir, "eval", inputs=(model_dir,))
    raw_dir = out_dir / "raw"
    runs = {}
    jobs = [(m, _settings(model_dir, m, sparsity, tasks, limit, dtype, include_path, weights)) for m in methods]
    gguf = llama_cpp_gguf(model_dir) if peers and humaneval.TASK in tasks and device.startswith("cpu") else None
    if gguf is not None:
        jobs.append((LLAMA_CPP, {"model": str(model_dir), "gguf": str(gguf), "tasks": [humaneval.TASK], "limit": limit,
                                 "humaneval": humaneval.SETTINGS}))
    for name, settings in jobs:
        path = raw_dir / f"{name}.json"
        if (resume or table_only) and path.is_file():
            saved = read_json(path, "raw results", "delete it, or run again with --no-resume to replace it")
            if not isinstance(saved, dict) or not isinstance(saved.get("results"), dict):
                raise PartinferError(f"raw results {path} are not an eval result object; delete it, or run with --no-resume")
            if saved.get("settings") == settings:
                print(f"{name}: reusing {path}", file=sys.stderr)
                runs[name] = saved
                continue
        if table_only:
            continue
        journal_name = f"raw/{name}.{humaneval.TASK}-answers.jsonl"
        if name == LLAMA_CPP:
            journal = None  # the peer answers every problem in one child
            run = run_llama_cpp_humaneval(model_dir, gguf, limit)
        else:
            journal = (AnswerJournal(output.reserve(journal_name), settings, resume)
                       if humaneval.TASK in tasks else None)
            run = run_method(model_dir, name, sparsity, tasks, limit, dtype, device, batch_size, include_path, weights,
                             journal)
        runs[name] = {"settings": settings, **run}
        if "error" not in run:  # a peer that failed is shown, not kept: the next run tries it again
            output.write_text(f"raw/{name}.json", json.dumps(runs[name], indent=2))
            if journal is not None:
                output.remove(journal_name)  # every answer is in the raw results now
    if not runs:
        raise PartinferError(f"no results with these settings in {raw_dir}; run without --table-only first")
    report = {"model": str(model_dir), "tasks": tasks, "methods": [name for name, _ in jobs if name in runs], "limit": limit,
              "dtype": dtype, "weights": weights, "gamma": sparsity.gamma, "delta": sparsity.delta, "phi": sparsity.phi,
              "runs": runs}
    output.write_text("results.md", f"{format_table(report)}\n\nThe PartInfer paper's ratios to dense, for comparison:\n\n"
                                    f"{format_published()}\n")
    return report


def _ratio(value: float, dense: float, metric: str) -> float | None:
    """method ÷ dense for scores; dense ÷ method for perplexities (so 1.0 = no loss, lower = worse)."""
    if metric in LOWER_IS_BETTER:
        return dense / value if value else None
    return value / dense if dense else None


def format_table(report: dict) -> str:
    """Markdown: one row per task metric, one column per method, ratio to dense beside each score."""
    methods = report["methods"]
    runs = report["runs"]
    lines = [
        f"γ {report['gamma']}, δ {report['delta']}, φ {report['phi']}, {report['dtype']}"
        f"{', ' + report['weights'] + ' weights' if report.get('weights') else ''}; "
        f"limit {report['limit'] or 'none'} examples per task. Cells: score ±standard error (ratio to dense; "
        "for perplexity dense ÷ method, so below 1 is a loss everywhere).",
        "",
        "| task | metric | n | " + " | ".join(methods) + " |",
        "|---|---|---:|" + "---:|" * len(methods),
    ]
    for task in report["tasks"]:
        first = runs[methods[0]]
        metrics = METRICS.get(task) or tuple(k for k in first["results"].get(task, {}) if not k.endswith("_stderr"))
        for metric in metrics:
            dense = runs["dense"]["results"].get(task, {}).get(metric) if "dense" in runs else None
            cells = []
            for m in methods:
                value = runs[m]["results"].get(task, {}).get(metric)
                if value is None:
                    cells.append("–")
                    continue
                ratio = _ratio(value, dense, metric) if dense is not None and m != "dense" else None
                stderr = runs[m]["results"][task].get(f"{metric}_stderr")
                cells.append(f"{value:.3f}" + (f" ±{stderr:.3f}" if isinstance(stderr, float) else "")
                             + (f" ({ratio:.2f})" if ratio is not None else ""))
            n = first.get("samples", {}).get(task, "")
            lines.append(f"| {task.removeprefix('partinfer_')} | {metric} | {n} | " + " | ".join(cells) + " |")
    failed = [f"{m}: no result: {runs[m]['error']}" for m in methods if runs[m].get("error")]
    return "\n".join(lines + ([""] + failed if failed else []))


def format_published() -> str:
    """The PartInfer paper's ratios to dense, for the docs beside ours."""
    methods = ("load-only", "coreinfer", "partinfer")
    lines = ["| published task (Llama-3.2-3B) | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for task, ratios in PUBLISHED_RATIOS.items():
        lines.append(f"| {task} | " + " | ".join(f"{ratios[m]:.2f}" for m in methods) + " |")
    return "\n".join(lines)
