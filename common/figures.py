"""Figures as files: matplotlib on the Agg backend (no display needed), saved atomically."""
from __future__ import annotations

from pathlib import Path

from common.files import write_atomic

DPI = 110


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: it draws into files, so it works on a node
    without a display. Imported on first use, so a program that draws nothing never loads it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = DPI) -> Path:
    """Lay out ``fig`` tightly, write it to ``path`` atomically (format from the suffix), close it.

    Closing matters: pyplot keeps every open figure alive, and a long study draws many.
    """
    path = Path(path)
    try:
        fig.tight_layout()
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    finally:
        pyplot().close(fig)
    return path
