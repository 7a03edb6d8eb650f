"""Reading the small JSON files users hand us (config.json, indexes, earlier results) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from partinfer.common.errors import PartinferError


def read_json(path: Path, what: str, fix: str) -> Any:
    """Parse a UTF-8 JSON file; a missing, unreadable, non-UTF-8 or malformed file is a PartinferError
    naming `what` the file is and `fix`, what to do about it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise PartinferError(f"{what} {path} does not exist; {fix}") from e
    except UnicodeDecodeError as e:
        raise PartinferError(f"{what} {path} is not UTF-8 text (byte {e.start}); {fix}") from e
    except json.JSONDecodeError as e:
        raise PartinferError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); {fix}") from e
    except OSError as e:
        raise PartinferError(f"cannot read {what} {path}: {e.strerror}") from e
