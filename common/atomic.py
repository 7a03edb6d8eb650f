"""Writing a file so that an interrupted write leaves nothing behind.

The file is written under a temporary name beside the destination and renamed into place only when
complete; on any exception (KeyboardInterrupt included) the temporary is removed, and temporaries
left by a killed process are removed by the next write of the same file. Whole output directories
are written by `common.output_dir`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from partinfer.common.errors import PartinferError

TEMP_MARK = ".partinfer-tmp-"


def temp_prefix(path: Path) -> str:
    """The name prefix of this process's temporaries for `path` (pid inside, so a later run can tell stale ones)."""
    return f".{path.name}{TEMP_MARK}{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temporaries(path: Path) -> list[Path]:
    """Remove temporaries for `path` left by processes that no longer run; returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{path.name}{TEMP_MARK}*"):
        pid_text = tmp.name[len(f".{path.name}{TEMP_MARK}"):].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renamed to `path` (mode 644) when the block succeeds.

    Refuses to replace a directory (a one-line error naming the path)."""
    path = Path(path)
    if path.is_dir():
        raise PartinferError(f"{path} is a directory; pass a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; ours are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
