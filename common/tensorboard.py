"""Optional TensorBoard scalars (``--tensorboard``): the writer, and a metrics row as scalars.

The ``tensorboard`` package is optional: only ``tensorboard_writer`` imports it, so nothing
else needs it installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError

TENSORBOARD_DIR = "tensorboard"


def tensorboard_available() -> bool:
    """True when the ``tensorboard`` package (needed by ``--tensorboard``) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_writer(log_dir: Path, start_epoch: int = 0):
    """A ``torch.utils.tensorboard.SummaryWriter`` for ``log_dir``, imported only here, so that
    nothing else needs the optional package. On resume, events at steps >= ``start_epoch``
    (written after the checkpoint, before a crash) are hidden, as in metrics.jsonl."""
    if not tensorboard_available():
        raise UserError(
            "--tensorboard needs the tensorboard package: pip install tensorboard (or pip install -e '.[tensorboard]')"
        )
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), purge_step=start_epoch if start_epoch > 0 else None)


def scalars(row: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """The numbers of a metrics row as ``(tag, value)``, nested dicts as ``outer/inner``;
    ``epoch`` (the step) and non-numbers (strings, None, lists, booleans) are left out."""
    out = []
    for key, value in row.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out += scalars(value, f"{tag}/")
        elif tag != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((tag, float(value)))
        elif tag != "epoch" and isinstance(value, torch.Tensor) and value.numel() == 1:
            out.append((tag, float(value.item())))
    return out
