"""Line plots written as PNG files, shared by `neurons show --plot` and `memory --plot`."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from partinfer.common.atomic import atomic_file
from partinfer.common.output_file import png_mark


@contextmanager
def png_figure(out: Path, command: str, ncols: int = 1, figsize: tuple[float, float] = (6, 4), nrows: int = 1,
               **subplots) -> Iterator[object]:
    """Yields a matplotlib figure and its axes (an array when there are several, as plt.subplots gives
    them); on exit lays it out and writes `out` atomically, marked as `command`'s output (so a later
    run of the same command may replace it, and nothing else: common.output_file)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        with atomic_file(Path(out)) as tmp:
            fig.savefig(tmp, dpi=120, format="png", metadata=png_mark(command))
    finally:
        plt.close(fig)


@contextmanager
def png_axes(out: Path, command: str, xlabel: str, ylabel: str, legend_size: int = 8) -> Iterator[object]:
    """Yields matplotlib axes to draw on; on exit adds labels, legend and grid and writes `out` atomically."""
    with png_figure(out, command) as (_, ax):
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=legend_size)
        ax.grid(alpha=0.3)
