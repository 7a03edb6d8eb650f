"""The lm-eval adapter: its scores equal a direct computation; φ = γ = 1 makes every method agree."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lm_eval.api.instance import Instance
from transformers import AutoModelForCausalLM

from partinfer.evaluation.lm_eval_adapter import PartinferLM
from tests.helpers import write_offline_data
from partinfer.runtime.sparsity import METHODS

PAIRS = [("The capital of France is", " Paris."), ("Two plus two equals", " four"), ("Once upon a time ", "there was")]


def requests(kind: str, args_list) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def test_dense_loglikelihood_equals_direct_computation(tiny_with_tokenizer):
    lm = PartinferLM(model=str(tiny_with_tokenizer / "model"), method="dense", dtype="fp32")
    ref = AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer / "model", dtype=torch.float32).eval()
    scores = lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (context, continuation), (score, _greedy) in zip(PAIRS, scores):
        ctx, cont = lm._context_and_continuation(context, continuation)
        with torch.no_grad():
            logprobs = torch.log_softmax(ref(torch.tensor([ctx + cont])).logits[0].float(), -1)
        direct = sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert math.isclose(score, direct, abs_tol=1e-3)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dense"])
def test_methods_agree_at_phi_gamma_one(tiny_with_tokenizer, method):
    common = dict(model=str(tiny_with_tokenizer / "model"), dtype="fp32",
                  model_neurons=str(tiny_with_tokenizer / "neurons.safetensors"))
    dense = PartinferLM(method="dense", **common).loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    other = PartinferLM(method=method, gamma=1.0, phi=1.0, **common).loglikelihood(
        requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(dense, other):
        assert math.isclose(a, b, abs_tol=1e-3) and ga == gb


def test_rolling_and_generate_until(tiny_with_tokenizer):
    lm = PartinferLM(model=str(tiny_with_tokenizer / "model"), method="partinfer", dtype="fp32",
                     model_neurons=str(tiny_with_tokenizer / "neurons.safetensors"))
    (rolling,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [("A short text to score, twice. " * 3,)]),
                                          disable_tqdm=True)
    assert rolling < 0
    (text,) = lm.generate_until(requests("generate_until", [("Hello", {"until": ["\n"], "max_gen_toks": 8})]),
                                disable_tqdm=True)
    assert isinstance(text, str) and "\n" not in text


@pytest.mark.parametrize("method", ["partinfer", "tokenwise"])
def test_shared_context_scoring_equals_one_at_a_time(tiny_with_tokenizer, method):
    """Choices of one question share the context's prefill and selection: same scores as separate runs."""
    lm = PartinferLM(model=str(tiny_with_tokenizer / "model"), method=method, dtype="fp32",
                     model_neurons=str(tiny_with_tokenizer / "neurons.safetensors"))
    pairs = [("Which colour is the sky?", answer) for answer in (" Blue.", " Green, mostly at night.", " Red")]
    together = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for pair, (score, greedy) in zip(pairs, together):
        ((alone, alone_greedy),) = lm.loglikelihood(requests("loglikelihood", [pair]), disable_tqdm=True)
        assert math.isclose(score, alone, abs_tol=1e-4) and greedy == alone_greedy


@pytest.mark.parametrize("method", ["dense", "partinfer", "tokenwise"])
def test_batched_generate_until_equals_one_by_one(tiny_with_tokenizer, method):
    common = dict(model=str(tiny_with_tokenizer / "model"), method=method, dtype="fp32",
                  model_neurons=str(tiny_with_tokenizer / "neurons.safetensors"))
    args = [(context, {"until": [".", "\n"], "max_gen_toks": 6})
            for context in ("Hello there", "The weather in the mountains today is", "One two three", "Why")]
    batched = PartinferLM(batch_size=4, **common).generate_until(requests("generate_until", args), disable_tqdm=True)
    single = PartinferLM(batch_size=1, **common).generate_until(requests("generate_until", args), disable_tqdm=True)
    assert batched == single and all("." not in t and "\n" not in t for t in batched)


def test_offline_tasks_load_and_eval_writes_table(tiny_with_tokenizer, tmp_path, monkeypatch):
    """Every task YAML loads without a hub; `run_eval` writes raw results and the table, then resumes."""
    from lm_eval.tasks import TaskManager

    from partinfer.evaluation.accuracy import OFFLINE_TASKS, TASKS_DIR, resolve_tasks, run_eval
    from partinfer.runtime.sparsity import SparsityConfig

    monkeypatch.setenv("PARTINFER_HOME", str(tmp_path / "home"))
    write_offline_data(tmp_path / "home")
    tasks = resolve_tasks(list(OFFLINE_TASKS))
    loaded = TaskManager(include_path=str(TASKS_DIR)).load(tasks)["tasks"]
    for name in tasks:
        assert len(list(loaded[name].test_docs())) == 2  # the eval split: second half of the 4 records
    mc1 = loaded["partinfer_truthfulqa_mc1"]
    assert mc1.doc_to_text(next(iter(mc1.test_docs()))).endswith("Q: Is water wet 2?\nA:")

    sparsity = SparsityConfig(gamma=0.7, delta=0.3, phi=0.4, model_neurons=tiny_with_tokenizer / "neurons.safetensors")
    report = run_eval(tiny_with_tokenizer / "model", tasks, ("dense", "partinfer"), sparsity, tmp_path / "out",
                      limit=2, dtype="fp32")
    table = (tmp_path / "out" / "results.md").read_text()
    for short in OFFLINE_TASKS:
        assert f"| {short} |" in table
    assert set(report["runs"]["partinfer"]["results"]) == set(tasks)
    raw = json.loads((tmp_path / "out" / "raw" / "partinfer.json").read_text())
    assert raw["results"]["partinfer_squad"]["f1"] == report["runs"]["partinfer"]["results"]["partinfer_squad"]["f1"]
    mtime = (tmp_path / "out" / "raw" / "dense.json").stat().st_mtime_ns
    run_eval(tiny_with_tokenizer / "model", tasks, ("dense",), sparsity, tmp_path / "out", limit=2, dtype="fp32")
    assert (tmp_path / "out" / "raw" / "dense.json").stat().st_mtime_ns == mtime  # reused, not rerun
    table_only = run_eval(tiny_with_tokenizer / "model", tasks, ("dense", "partinfer", "static"), sparsity,
                          tmp_path / "out", limit=2, dtype="fp32", table_only=True)
    assert table_only["methods"] == ["dense", "partinfer"]  # static has no results: nothing was run


def test_eval_include_path_runs_a_users_task(tiny_with_tokenizer, tmp_path):
    """`eval --include-path DIR`: a task YAML of the user's, on a local JSONL file, runs next to ours."""
    from partinfer.common.errors import PartinferError
    from partinfer.evaluation.accuracy import run_eval
    from partinfer.runtime.sparsity import SparsityConfig

    tasks_dir = tmp_path / "my_tasks"
    tasks_dir.mkdir()
    data = tmp_path / "words.jsonl"
    data.write_text("".join(json.dumps({"text": f"The river number {i} runs to the sea."}) + "\n" for i in range(3)))
    (tasks_dir / "my_words.yaml").write_text(
        "task: my_words\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n")
    sparsity = SparsityConfig(model_neurons=tiny_with_tokenizer / "neurons.safetensors")
    report = run_eval(tiny_with_tokenizer / "model", ["my_words"], ("dense",), sparsity, tmp_path / "out", limit=2,
                      dtype="fp32", include_path=tasks_dir)
    assert report["runs"]["dense"]["results"]["my_words"]["word_perplexity"] > 1
    assert report["runs"]["dense"]["settings"]["include_path"] == str(tasks_dir)
    with pytest.raises(PartinferError, match="is not a directory"):
        run_eval(tiny_with_tokenizer / "model", ["my_words"], ("dense",), sparsity, tmp_path / "out2",
                 include_path=tmp_path / "missing")
    assert not (tmp_path / "out2").exists()


def test_a_task_yaml_that_cannot_be_loaded_is_a_one_line_error(tiny_with_tokenizer, tmp_path):
    """`!function` naming a module that does not exist: our error names the directory and the cause."""
    from partinfer.common.errors import PartinferError
    from partinfer.evaluation.accuracy import run_eval
    from partinfer.runtime.sparsity import SparsityConfig

    tasks_dir = tmp_path / "broken"
    tasks_dir.mkdir()
    (tasks_dir / "broken.yaml").write_text(
        "task: broken_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: x.jsonl\ntest_split: test\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: !function no_such_module.to_text\n"
        "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n")
    sparsity = SparsityConfig(model_neurons=tiny_with_tokenizer / "neurons.safetensors")
    with pytest.raises(PartinferError, match="could not be loaded.*no_such_module"):
        run_eval(tiny_with_tokenizer / "model", ["broken_task"], ("dense",), sparsity, tmp_path / "out", limit=2,
                 dtype="fp32", include_path=tasks_dir)


def test_a_task_whose_data_file_is_missing_names_the_path(tiny_with_tokenizer, tmp_path):
    """A user's task YAML whose data_files names a file that is not there: the error names that path (not "the hub")."""
    from partinfer.common.errors import PartinferError
    from partinfer.evaluation.accuracy import run_eval
    from partinfer.runtime.sparsity import SparsityConfig

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    missing = tmp_path / "gone" / "words.jsonl"
    (tasks_dir / "words.yaml").write_text(
        f"task: gone_words\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {missing}\ntest_split: test\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n")
    sparsity = SparsityConfig(model_neurons=tiny_with_tokenizer / "neurons.safetensors")
    with pytest.raises(PartinferError, match="could not be found") as raised:
        run_eval(tiny_with_tokenizer / "model", ["gone_words"], ("dense",), sparsity, tmp_path / "out", limit=2,
                 dtype="fp32", include_path=tasks_dir)
    assert str(missing) in str(raised.value) and "hub" not in str(raised.value)
