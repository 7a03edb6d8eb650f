"""Answers kept as they come, so a long generation task resumes where it stopped.

HumanEval on a 1.5B model at bf16 is hours of decoding; a method's raw results are written only when
all of its answers are scored. The journal is one JSON line per answer, appended and flushed the
moment the answer exists, after a first line that holds the run's settings. A later run with the same
settings reads it back and asks only what is missing; other settings start it afresh. A line cut off
by a crash (the last one) is dropped and asked again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from partinfer.common.atomic import atomic_file


class AnswerJournal:
    """One task's answers for one configuration, keyed by the problem's id, at `path` (a JSON-lines file)."""

    def __init__(self, path: Path, settings: dict, resume: bool = True):
        self.path = Path(path)
        self.settings = settings
        self.answers: dict[str, str] = self._read() if resume else {}
        self._rewrite()  # the header and the answers kept: a torn last line is gone before we append

    def _read(self) -> dict[str, str]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return {}
        try:
            header = json.loads(lines[0]) if lines else None
        except ValueError:
            return {}
        if not isinstance(header, dict) or header.get("settings") != self.settings:
            return {}
        answers = {}
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except ValueError:
                break  # a line a crash cut off: it and anything after it are asked again
            if not (isinstance(entry, dict) and isinstance(entry.get("id"), str) and isinstance(entry.get("answer"), str)):
                break
            answers[entry["id"]] = entry["answer"]
        return answers

    def _rewrite(self) -> None:
        lines = [json.dumps({"settings": self.settings})]
        lines += [json.dumps({"id": key, "answer": answer}) for key, answer in self.answers.items()]
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    def add(self, key: str, answer: str) -> None:
        """Keep one answer: on disk (flushed to the device) before this returns."""
        self.answers[key] = answer
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"id": key, "answer": answer}) + "\n")
            f.flush()
            os.fsync(f.fileno())
