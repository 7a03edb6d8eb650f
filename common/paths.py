"""Where partinfer keeps what it makes once: converted models, data sets, packed copies, built kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """$PARTINFER_HOME, default ~/.cache/partinfer."""
    return Path(os.environ.get("PARTINFER_HOME", Path.home() / ".cache" / "partinfer")).expanduser()
