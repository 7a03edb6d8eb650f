"""File digests written with an output and checked when it is used: flipped or lost bytes are an error, not data.

`partinfer pack` records the SHA-256 of every file it writes in its manifest (`file_digests`). A load
must not re-hash a gigabyte pack every time (a partial load reads a fraction of it), so a file is
hashed once per change: after a file matched its digest, its (size, modification time, inode) are
remembered in the cache (`$PARTINFER_HOME/verified/`), and a later load hashes it again only when one
of them differs. Anything that rewrites a file — an editor, a copy, a tool flipping bytes in place —
changes its modification time, so the next load checks it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from partinfer.common.atomic import atomic_file
from partinfer.common.errors import PartinferError
from partinfer.common.paths import cache_home

CHUNK = 8 << 20


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 8 MiB chunks (the file need not fit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def directory_digests(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{file name: SHA-256} of every plain file directly in `directory` but those named in `skip`."""
    return {p.name: file_sha256(p) for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name not in skip}


def _stamp(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _record_path(directory: Path) -> Path:
    key = hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:24]
    return cache_home() / "verified" / f"{key}.json"


def _read_record(record: Path) -> dict:
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def damaged_files(directory: Path, digests: dict[str, str]) -> list[str]:
    """The files of `directory` (by name) that are missing or no longer match `digests`; [] when all match.

    Files that matched before and have not changed since (size, mtime, inode) are not read again."""
    directory = Path(directory)
    record_path = _record_path(directory)
    record = _read_record(record_path)
    damaged, checked = [], {}
    for name, digest in sorted(digests.items()):
        path = directory / name
        try:
            stamp = _stamp(path)
        except (OSError, ValueError):  # missing, or a name no file can have (a NUL byte)
            damaged.append(name)
            continue
        if record.get(name) == [*stamp, digest]:
            checked[name] = record[name]
            continue
        try:
            matches = path.is_file() and file_sha256(path) == digest
        except OSError:  # unreadable: as good as damaged
            matches = False
        if matches:
            checked[name] = [*stamp, digest]
        else:
            damaged.append(name)
    if checked != {k: v for k, v in record.items() if k in digests}:
        try:
            record_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(record_path) as tmp:
                tmp.write_text(json.dumps(checked), encoding="utf-8")
        except (OSError, PartinferError):
            pass  # a cache we cannot write only costs hashing again next time
    return damaged


def check_files(directory: Path, digests: dict[str, str], fix: str) -> None:
    """A one-line error naming the first file of `directory` that is missing or does not match its digest."""
    damaged = damaged_files(directory, digests)
    if damaged:
        path = Path(directory) / damaged[0]
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        what = "is missing" if not path.exists() else "is damaged: its content does not match the digest it was written with"
        raise PartinferError(f"{path} {what}{more}; {fix}")
