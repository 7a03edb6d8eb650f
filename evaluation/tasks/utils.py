"""Data and metrics of partinfer's offline lm-eval tasks (the YAML files beside this one).

Every task reads the `eval` split (second half) of a built-in task of `common.data`, so the
shipped neuron files — made from the `profile` split (first half) — never saw an evaluated example.
The data comes from the `bigbench` archive on PyPI (fetched once into `$PARTINFER_HOME/data`).
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter

import datasets
import numpy as np

from partinfer.common.data import load_task_records

# The standard 6-shot QA primer of TruthfulQA's multiple-choice setting (Lin et al., 2021).
QA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.\n\n"
)
# Input budgets (words), so that six methods x 200 examples fit a 2-core CPU; the same for every method.
SUMMARY_WORDS = 150  # XSum: the article's lead (it carries the one-sentence summary)
STORY_WORDS = 200  # CoQA: the story's opening (where the first question's answer usually is)
PERPLEXITY_WORDS = 100  # perplexity texts: each document's first words


def _first_words(text: str, n: int) -> str:
    words = text.split(" ")
    return text if len(words) <= n else " ".join(words[:n])


def _records(task: str) -> list[dict]:
    return load_task_records(task, "eval")


def eval_split(task: str, **_metadata) -> datasets.DatasetDict:
    """`custom_dataset` of every task: the built-in task's eval split as the `eval` split."""
    if task == "truthfulqa":
        rows = [{
            "question": r["question"], "mc1_choices": r["mc1_choices"], "mc1_label": r["mc1_label"],
            "mc2_choices": r["correct_answers"] + r["incorrect_answers"],
            "mc2_labels": [1] * len(r["correct_answers"]) + [0] * len(r["incorrect_answers"]),
        } for r in _records("truthfulqa")]
    elif task == "squad":
        rows = [{"prompt": r["prompt"], "target": r["target"].strip()} for r in _records("squad")]
    elif task == "coqa":
        rows = [{"prompt": f"{_first_words(r['story'].strip(), STORY_WORDS)}\n\nQ: {r['question']}\nA:",
                 "target": r["target"].strip()} for r in _records("coqa")]
    elif task == "xsum":
        rows = [{"prompt": f"Article: {_first_words(r['document'], SUMMARY_WORDS)}\n\nOne-sentence summary:",
                 "target": r["target"].strip()} for r in _records("xsum")]
    elif task == "wikilingua":
        rows = [{"text": _first_words(r["document"], PERPLEXITY_WORDS)} for r in _records("wikilingua")]
    else:
        raise ValueError(f"no offline evaluation data for task {task!r}")
    return datasets.DatasetDict({"eval": datasets.Dataset.from_list(rows)})


def truthfulqa_prompt(doc: dict) -> str:
    return f"{QA_PRIMER}Q: {doc['question']}\nA:"


def process_mc2(doc: dict, results: list[tuple[float, bool]]) -> dict:
    """MC2: the normalised probability mass of the true answers."""
    ll = np.array([r[0] for r in results])
    probs = np.exp(ll - ll.max())
    return {"acc": float(probs[np.array(doc["mc2_labels"]) == 1].sum() / probs.sum())}


def _normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _f1(prediction: str, target: str) -> float:
    pred, gold = _normalize(prediction).split(), _normalize(target).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def process_qa(doc: dict, results: list[str]) -> dict:
    """Extractive QA: exact match and token F1 (×100) of the first generated line against the target."""
    prediction = results[0].strip()
    return {"exact_match": 100.0 * (_normalize(prediction) == _normalize(doc["target"])),
            "f1": 100.0 * _f1(prediction, doc["target"])}


@functools.cache
def _rouge_scorer():
    """Built once per process: it loads NLTK's stemmer."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def process_summary(doc: dict, results: list[str]) -> dict:
    """ROUGE-1/2/L F-measure (×100) of the generated summary against the reference."""
    scores = _rouge_scorer().score(doc["target"], results[0].strip())
    return {name: 100.0 * scores[name].fmeasure for name in ("rouge1", "rouge2", "rougeL")}


def process_perplexity(doc: dict, results: list[float]) -> dict:
    (loglikelihood,) = results
    words, size = len(re.split(r"\s+", doc["text"])), len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}
