"""The built-in code data set: the standard library's functions and classes, split by file."""

from __future__ import annotations

from partinfer.common.code_data import NAME, code_records
from partinfer.common.data import load_task_records, load_texts


def test_the_split_is_deterministic_and_disjoint_by_file():
    profile, evaluation = code_records("profile"), code_records("eval")
    assert len(profile) > 100 and len(evaluation) > 100
    files = lambda records: {r["id"].split(":")[0] for r in records}  # noqa: E731
    assert not files(profile) & files(evaluation)
    code_records.cache_clear()
    assert code_records("profile") == profile  # the same records when read again
    assert [r["id"] for r in load_task_records(NAME, "all")] == [r["id"] for r in code_records("all")]
    assert len(code_records("all")) == len(profile) + len(evaluation)


def test_code_texts_are_python_source_and_work_as_a_built_in_task():
    import ast

    texts = load_texts(NAME, 5)
    assert len(texts) == 5 and all(t.lstrip().startswith(("def ", "class ", "async def ", "@")) for t in texts)
    for text in texts:
        ast.parse(text)  # whole definitions (cut only at a line when very long)
