"""cifar/train.py's pictures: loss/accuracy curves (common.figures.plot_curves), the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.figures import plot_curves, pyplot, save_figure


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], path: Path, title: str = "") -> None:
    """Row-normalised heat map with the raw counts written in each cell (rows = true class)."""
    counts = confusion.double()
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    fig, ax = pyplot().subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.65 * n))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                int(counts[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "test confusion matrix (row-normalised colour, counts)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    save_figure(fig, path)


def plot_run(
    rows: list[dict[str, Any]], final: dict[str, Any], classes: Sequence[str], plots_dir: Path, arch: str
) -> None:
    """``curves.png`` from the epoch rows (if any) and ``confusion_matrix.png`` of the final test."""
    if rows:
        plot_curves(
            rows,
            {"loss": ["train_loss", "test_loss"], "accuracy": ["train_accuracy", "test_accuracy"]},
            plots_dir / "curves.png",
            title=f"CIFAR-10 {arch}",
        )
    plot_confusion(
        final["confusion_matrix"],
        classes,
        plots_dir / "confusion_matrix.png",
        title=f"test accuracy {final['test_accuracy']:.4f}",
    )
