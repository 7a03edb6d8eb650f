"""Single-file outputs (`--plot`) that never replace a user's file: the same rule as `--out` directories.

A command may write a single file when the path does not exist, or when it holds an earlier output
of the *same* command — recognised by the mark the command wrote into it (a PNG text chunk
`partinfer-output` = the command's name) — and never when it is one of the command's inputs.
Anything else is a one-line error that names the path and the fix, raised before any work is done.
Directories follow `common.output_dir`; files are written through `common.atomic.atomic_file`.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Iterable

from partinfer.common.errors import PartinferError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MARK_KEY = "partinfer-output"


def png_mark(command: str) -> dict[str, str]:
    """The PNG text metadata that marks a file as `command`'s output (matplotlib's `savefig(metadata=...)`)."""
    return {MARK_KEY: command}


def png_text(path: Path, limit: int = 1 << 16) -> dict[str, str]:
    """The tEXt chunks of a PNG file's first `limit` bytes ({} for anything that is not a PNG)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
    except OSError:
        return {}
    if not data.startswith(PNG_SIGNATURE):
        return {}
    text, at = {}, len(PNG_SIGNATURE)
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        body = data[at + 8 : at + 8 + length]
        if kind == b"tEXt" and b"\0" in body:
            key, _, value = body.partition(b"\0")
            text[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"zTXt" and b"\0" in body:
            key, _, value = body.partition(b"\0")
            try:
                text[key.decode("latin-1")] = zlib.decompress(value[1:]).decode("latin-1")
            except zlib.error:
                pass
        if kind in (b"IDAT", b"IEND"):
            break
        at += 12 + length
    return text


def check_output_file(path: Path, command: str, option: str = "--plot", inputs: Iterable[Path | None] = ()) -> Path:
    """Refuse a single-file output that `command` must not write; returns the path. Writes nothing."""
    path = Path(path)
    target = path.expanduser().resolve()
    fix = f"pass a new file name with {option}"
    for given in inputs:
        if given is not None and Path(given).expanduser().resolve() == target:
            raise PartinferError(f"{option} {path} is this command's input {given}; {fix}")
    if target.is_dir():
        raise PartinferError(f"{option} {path} is a directory; {fix}")
    if target.exists() and png_text(target).get(MARK_KEY) != command:
        raise PartinferError(f"{option} {path} exists and was not written by `partinfer {command}`; "
                             f"{fix}, or move that file away")
    return path
