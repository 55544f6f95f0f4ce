"""Figures as files: matplotlib on the Agg backend (no display needed), saved atomically;
per-epoch curves of a run's metrics (``plot_curves``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def plot_curves(rows: list[dict[str, Any]], panels: dict[str, list[str]], path: Path, title: str = "") -> None:
    """Line plots of per-epoch metrics: one panel per entry, ``{"loss": ["train_loss", ...]}``."""
    fig, axes = pyplot().subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    epochs = [row["epoch"] + 1 for row in rows]
    for ax, (ylabel, keys) in zip(axes[0], panels.items()):
        for key in keys:
            values = [row.get(key) for row in rows]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
