"""`python-stdlib`: a built-in code data set, the interpreter's own standard library source.

Real, licensed-to-ship Python: every top-level function and class of the standard library's
top-level modules (files of 4 kB or more, `sysconfig.get_paths()["stdlib"]`), one record each. The
split is by file and deterministic: a file is in the `profile` half or the `eval` half by the parity
of its name's SHA-256, so no function is profiled and evaluated alike, and the halves are disjoint
whatever else changes. Records: `id` (module:name), `prompt` (the source), `target` ("").
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sysconfig
from pathlib import Path

NAME = "python-stdlib"
MIN_FILE_BYTES = 4096
MIN_CHARS, MAX_CHARS = 200, 4000  # a function or class shorter is noise, longer is cut at a line


def file_split(path: Path) -> str:
    """"profile" or "eval": by the parity of the SHA-256 of the file's name."""
    return "profile" if hashlib.sha256(path.name.encode()).digest()[0] % 2 == 0 else "eval"


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.stat().st_size >= MIN_FILE_BYTES)


def definitions(path: Path) -> list[dict]:
    """The top-level functions and classes of one file, in file order (a file that does not parse: none)."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    records = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        text = "".join(lines[start : node.end_lineno])
        if len(text) > MAX_CHARS:
            text = text[: text.rfind("\n", 0, MAX_CHARS) + 1]
        if len(text) >= MIN_CHARS:
            records.append({"id": f"{path.stem}:{node.name}", "prompt": text, "target": ""})
    return records


@functools.cache
def code_records(split: str) -> tuple[dict, ...]:
    """The records of one split ("profile", "eval" or "all"), in file then source order."""
    return tuple(r for path in stdlib_files() if split == "all" or file_split(path) == split
                 for r in definitions(path))
