"""Output directories that never lose a user's file: what a command may write into, and how.

The promise: a command writes only inside what it creates. An `--out` directory is accepted when it
does not exist, is empty, or is an earlier output of the *same* command — recognised by that
command's manifest (`partinfer_<command>.json`, which lists every file the command wrote) and
holding nothing else. Anything else — a file, the current directory, a directory that holds the
command's own inputs, a directory with files we did not write — is a one-line error that names the
path and the fix, raised before any work is done.

Two ways to write:
- `replace_output_dir`: the whole directory is built under a temporary name beside it and moved
  into place when complete (`pack`, `profile`, `prepare`); an earlier output is swapped out and
  removed only after the new one is in place.
- `IncrementalOutput`: files are added one by one, each written atomically and recorded in the
  manifest before it appears (`eval`, which resumes from its earlier raw results).

Temporaries are named `.<name>.partinfer-tmp-<pid>-<random>`; those of processes that are gone
(an interrupted run) are removed by the next run that writes the same output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from partinfer.common.atomic import TEMP_MARK, atomic_file, clean_stale_temporaries, temp_prefix
from partinfer.common.errors import PartinferError

MANIFEST_FORMAT = "partinfer-output"


def manifest_name(command: str) -> str:
    return f"partinfer_{command}.json"


def read_manifest(directory: Path, command: str) -> dict | None:
    """The manifest of an earlier output of `command` in `directory`, or None when there is none (or it is not ours)."""
    path = Path(directory) / manifest_name(command)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("output") != MANIFEST_FORMAT or manifest.get("command") != command:
        return None
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return manifest


def _relative_files(directory: Path) -> set[str]:
    """Every entry under `directory` that is not a directory (files, links), as relative POSIX paths;
    our own write temporaries (`common.atomic`) are left out: they are ours, and cleaned when stale."""
    found = set()
    for root, dirs, files in os.walk(directory):
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            if TEMP_MARK not in name:
                found.add((Path(root) / name).relative_to(directory).as_posix())
    return found


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(path: Path, command: str, inputs: Iterable[Path | None] = ()) -> Path:
    """Refuse an `--out` that `command` must not write into; returns the resolved path. Writes nothing."""
    path = Path(path)
    target = path.expanduser().resolve()
    fix = "pass a new directory name with --out"
    if target.exists() and not target.is_dir():
        raise PartinferError(f"--out {path} is a file, not a directory; {fix}")
    if target == Path.cwd().resolve() or _is_within(Path.cwd().resolve(), target):
        raise PartinferError(f"--out {path} is the current directory (or holds it); {fix}")
    for given in inputs:
        if given is None:
            continue
        source = Path(given).expanduser().resolve()
        if _is_within(source, target):
            raise PartinferError(f"--out {path} holds this command's input {given}; {fix}")
    if target.is_dir() and any(target.iterdir()):
        manifest = read_manifest(target, command)
        if manifest is None:
            raise PartinferError(
                f"--out {path} already holds files that `partinfer {command}` did not write; {fix} or empty it first"
            )
        foreign = sorted(_relative_files(target) - set(manifest["files"]) - {manifest_name(command)})
        if foreign:
            raise PartinferError(
                f"--out {path} holds {foreign[0]}, which `partinfer {command}` did not write; move it away or {fix}"
            )
    return target


def _write_manifest(directory: Path, command: str, files: Iterable[str], extra: dict | None = None) -> None:
    manifest = {"output": MANIFEST_FORMAT, "command": command, "files": sorted(files), **(extra or {})}
    with atomic_file(directory / manifest_name(command)) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")


@contextmanager
def replace_output_dir(path: Path, command: str, inputs: Iterable[Path | None] = (),
                       manifest: dict | None = None) -> Iterator[Path]:
    """Yields an empty temporary directory; when the block succeeds it becomes `path`, with a manifest.

    `path` is checked first (`check_output_dir`). An earlier output of the same command is moved
    aside, the new one moved in, then the old one removed; an empty existing directory receives the
    new files. On any exception (KeyboardInterrupt included) only the temporary is removed.
    """
    target = check_output_dir(path, command, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    old: Path | None = None
    try:
        yield tmp
        _write_manifest(tmp, command, _relative_files(tmp), manifest)
        check_output_dir(path, command, inputs)  # nothing foreign appeared while we worked
        if target.is_dir() and not any(target.iterdir()):
            for entry in tmp.iterdir():
                os.rename(entry, target / entry.name)
        else:
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
                os.rename(target, old / "previous")
            os.rename(tmp, target)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


class IncrementalOutput:
    """An output directory that grows file by file (e.g. `eval`'s raw results), each file recorded in the manifest."""

    def __init__(self, path: Path, command: str, inputs: Iterable[Path | None] = ()):
        self.path = check_output_dir(path, command, inputs)
        self.command = command
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(self.path, command)
        self.files: set[str] = set(manifest["files"]) if manifest else set()
        for rel in self.files:
            clean_stale_temporaries(self.path / rel)

    def reserve(self, relative: str) -> Path:
        """Record a file in the manifest before it exists (so a crash never leaves a foreign file); write it
        atomically (`atomic_file`) at the returned path."""
        if relative not in self.files:
            self.files.add(relative)
            _write_manifest(self.path, self.command, self.files)
        return self.path / relative

    def write_text(self, relative: str, text: str) -> Path:
        """Write one text file atomically, recorded in the manifest first."""
        dest = self.reserve(relative)
        with atomic_file(dest) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return dest

    def remove(self, relative: str) -> None:
        """Remove a file this output wrote (and only such a file), then drop it from the manifest."""
        if relative not in self.files:
            raise ValueError(f"{relative} is not a file of this output")
        (self.path / relative).unlink(missing_ok=True)
        self.files.discard(relative)
        _write_manifest(self.path, self.command, self.files)
