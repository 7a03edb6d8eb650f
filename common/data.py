"""Offline data sets: built-in tasks from the `bigbench` source archive on PyPI, plus hub and local files.

`fetch_data()` downloads `bigbench==1.0.0` (a source archive) once with pip, extracts only the JSON
members we need and writes one JSONL per built-in task into `$PARTINFER_HOME/data/`. Every record
has `id`, `prompt` (the task's prompt template filled in) and `target`, plus task-specific fields.

Splits: each built-in task's records keep the archive's order; the first half is the `profile`
split (what `partinfer profile` reads by default) and the second half the `eval` split, so neuron
files are never made from evaluated examples.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterable

from partinfer.common import code_data
from partinfer.common.atomic import atomic_file
from partinfer.common.errors import PartinferError
from partinfer.common.paths import cache_home

BIGBENCH_PIP = "bigbench==1.0.0"
BIGBENCH_FILE = "bigbench-1.0.0.tar.gz"
BIGBENCH_SIZE = 358_249_635
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_ROOT = "bigbench/benchmark_tasks/"
SPLITS = ("profile", "eval", "all")


def _truthfulqa(members: dict[str, dict]) -> list[dict]:
    questions = members["truthful_qa/questions.json"]["examples"]
    mc = {e["input"]: e["target_scores"] for e in members["truthful_qa/task_mc.json"]["examples"]}
    records = []
    for i, q in enumerate(questions):
        scores = mc.get(q["Question"], {})
        records.append({
            "id": f"truthfulqa-{i}", "prompt": f"Q: {q['Question']}\nA:", "target": " " + q["Best answer"],
            "question": q["Question"], "correct_answers": q["True answers"], "incorrect_answers": q["False answers"],
            "mc1_choices": list(scores), "mc1_label": next((j for j, s in enumerate(scores.values()) if s == 1), 0),
        })
    return records


def _squad(members: dict[str, dict]) -> list[dict]:
    records = []
    for i, e in enumerate(members["disfl_qa/task.json"]["examples"]):
        question, _, context = e["input"].partition("\ncontext:")
        question, context = question.strip(), context.strip()
        records.append({
            "id": f"squad-{i}", "prompt": f"Context: {context}\nQuestion: {question}\nAnswer:",
            "target": e["target"], "context": context, "question": question,
        })
    return records


def _summaries(member: str, name: str) -> Callable[[dict[str, dict]], list[dict]]:
    def convert(members: dict[str, dict]) -> list[dict]:
        return [
            {"id": f"{name}-{i}", "prompt": f"Article: {e['input'].strip()}\n\nOne-sentence summary:",
             "target": " " + e["target"].strip(), "document": e["input"].strip()}
            for i, e in enumerate(members[member]["examples"])
        ]
    return convert


def _coqa(members: dict[str, dict]) -> list[dict]:
    records = []
    for i, story in enumerate(members["coqa_conversational_question_answering/coqa.test.json"]["data"]):
        q, a = story["questions"][0]["input_text"], story["answers"][0]["input_text"]
        records.append({
            "id": f"coqa-{i}", "prompt": f"{story['story'].strip()}\n\nQ: {q}\nA:", "target": " " + a,
            "story": story["story"], "question": q,
        })
    return records


BUILTIN_TASKS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, dict]], list[dict]]]] = {
    "truthfulqa": (("truthful_qa/questions.json", "truthful_qa/task_mc.json"), _truthfulqa),
    "squad": (("disfl_qa/task.json",), _squad),
    "xsum": (("gem/xsum/task.json",), _summaries("gem/xsum/task.json", "xsum")),
    "coqa": (("coqa_conversational_question_answering/coqa.test.json",), _coqa),
    "wikilingua": (("gem/wikilingua_en/task.json",), _summaries("gem/wikilingua_en/task.json", "wikilingua")),
}


def data_dir() -> Path:
    return cache_home() / "data"


def write_jsonl_atomic(path: Path, records: Iterable[dict]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _archive_is_whole(path: Path) -> bool:
    """The cached archive has the size and SHA-256 of the release (a killed or truncated download has not)."""
    if path.stat().st_size != BIGBENCH_SIZE:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == BIGBENCH_SHA256


def _download_bigbench() -> Path:
    downloads = cache_home() / "downloads"
    archive = downloads / BIGBENCH_FILE
    if archive.is_file():
        if _archive_is_whole(archive):
            return archive
        print(f"{archive} is incomplete or corrupt; downloading it again", file=sys.stderr)
        archive.unlink()  # ours: written by an earlier fetch into our cache
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"downloading {BIGBENCH_PIP} (358 MB source archive) from the package registry, once ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", BIGBENCH_PIP, "-d", str(downloads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not archive.is_file():
        raise PartinferError(f"could not download {BIGBENCH_PIP} from the package registry: {done.stderr.strip()[-300:]}")
    if not _archive_is_whole(archive):
        archive.unlink()
        raise PartinferError(f"the downloaded {BIGBENCH_FILE} does not have the release's SHA-256; run again")
    return archive


def fetch_data(tasks: Iterable[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Make sure the built-in tasks' JSONL files exist (download + extract once); returns task -> path."""
    tasks = list(tasks or BUILTIN_TASKS)
    for t in tasks:
        if t not in BUILTIN_TASKS:
            raise PartinferError(f"unknown task {t!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    paths = {t: data_dir() / f"{t}.jsonl" for t in tasks}
    missing = [t for t in tasks if force or not paths[t].is_file()]
    if not missing:
        return paths
    archive = _download_bigbench()
    wanted = {m for t in missing for m in BUILTIN_TASKS[t][0]}
    members: dict[str, dict] = {}
    try:
        with tarfile.open(archive) as tar:
            for info in tar:
                rel = info.name.split(BIGBENCH_ROOT, 1)[-1]
                if BIGBENCH_ROOT in info.name and rel in wanted and info.isfile():
                    members[rel] = json.load(tar.extractfile(info))
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise PartinferError(f"could not extract {archive} ({type(e).__name__}); delete it and run "
                             "`partinfer data fetch` again") from e
    for t in missing:
        write_jsonl_atomic(paths[t], BUILTIN_TASKS[t][1](members))
    return paths


def split_records(records: list[dict], split: str) -> list[dict]:
    if split not in SPLITS:
        raise PartinferError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    half = len(records) // 2
    return records[:half] if split == "profile" else records[half:] if split == "eval" else records


def read_jsonl(path: Path, fix: str = "fix the file") -> list[dict]:
    """One JSON object per non-empty line; a bad line is a one-line error naming the file, the line and `fix`."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PartinferError(f"{path} line {number} is not valid JSON ({e.msg}); {fix}") from None
                if not isinstance(record, dict):
                    raise PartinferError(f"{path} line {number} is not a JSON object; {fix}")
                records.append(record)
    except UnicodeDecodeError:
        raise PartinferError(f"{path} is not UTF-8 text; {fix}") from None
    return records


def is_builtin(name: str) -> bool:
    """A built-in task: one of the bigbench ones, or the standard library's code (common/code_data.py)."""
    return name in BUILTIN_TASKS or name == code_data.NAME


def load_task_records(name: str, split: str = "profile") -> list[dict]:
    """Records of a built-in task (fetched on first use)."""
    if name == code_data.NAME:
        if split not in SPLITS:
            raise PartinferError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return [dict(r) for r in code_data.code_records(split)]
    path = fetch_data([name])[name]
    records = read_jsonl(path, f"run `partinfer data fetch --force {name}` to extract it again")
    if any("prompt" not in r for r in records):
        raise PartinferError(f"{path} has records without a prompt; run `partinfer data fetch --force {name}`")
    return split_records(records, split)


def load_texts(
    name: str, num_samples: int | None = None, split: str = "profile", column: str | None = None,
    config: str | None = None, hub_split: str = "train",
) -> list[str]:
    """Prompts of a data set: a built-in task, a local .json/.jsonl/.txt/.parquet file, or a hub data set."""
    if is_builtin(name):
        texts = [r["prompt"] for r in load_task_records(name, split)]
    else:
        texts = _load_external(name, column, config, hub_split)
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if num_samples is not None:
        texts = texts[:num_samples]
    if not texts:
        raise PartinferError(f"data set {name!r} gave no non-empty texts; check the file, --column or --split")
    return texts


def _load_external(name: str, column: str | None, config: str | None, hub_split: str) -> list[str]:
    import datasets

    path = Path(name)
    suffix = path.suffix.lower()
    if path.exists() or suffix in (".json", ".jsonl", ".txt", ".parquet", ".csv"):
        if not path.is_file():
            raise PartinferError(f"data file {path} does not exist")
        builder = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
        if builder is None:
            raise PartinferError(f"unsupported data file type {suffix!r}; use .json, .jsonl, .txt, .parquet or .csv")
        if path.stat().st_size == 0:
            raise PartinferError(f"data file {path} is empty; give it some text")
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # datasets wraps parse errors of every format in its own types
            cause = e.__cause__ or e
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
            raise PartinferError(f"could not read data file {path} as {suffix} ({first}); check that it is valid "
                                 f"UTF-8 {'JSON lines' if builder == 'json' else suffix} and not empty") from e
    else:
        try:
            ds = datasets.load_dataset(name, config, split=hub_split)
        except Exception as e:  # hub errors come in many types
            raise PartinferError(
                f"unknown task {name!r}: not a built-in task ({', '.join([*BUILTIN_TASKS, code_data.NAME])}), not a local file, "
                f"and not loadable from the hub ({type(e).__name__})"
            ) from e
    column = column or next((c for c in ("text", "prompt", "question", "input", "document") if c in ds.column_names), None)
    if column is None or column not in ds.column_names:
        raise PartinferError(f"data set {name!r} has no column {column!r}; pass --column (columns: {', '.join(ds.column_names)})")
    try:
        return list(ds[column])
    except UnicodeDecodeError:
        raise PartinferError(f"data set {name!r} holds text that is not UTF-8; save it as UTF-8") from None
