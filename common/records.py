"""What a run leaves in its directory: ``metrics.jsonl`` (one line per epoch), ``summary.json``
(the final metrics plus ``run_info``: config, versions, commit), and other result files.

Only rank 0 writes, always atomically (``common.files``); ``RunRecorder``'s methods are safe to
call on all ranks. With ``--tensorboard`` the recorder also writes each epoch's numbers as
TensorBoard scalars (``common.tensorboard``).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

from common.dist import DistInfo
from common.files import write_text_atomic
from common.tensorboard import TENSORBOARD_DIR, scalars, tensorboard_writer


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON atomically (``common.files``), so readers never see half a file."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):  # numpy arrays
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def git_commit() -> str | None:
    """The repository's HEAD commit, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_info(dist: DistInfo, config: Any) -> dict[str, Any]:
    """Everything needed to reproduce or compare a run (recorded in summary.json)."""
    device_name = (
        torch.cuda.get_device_name(dist.device)
        if dist.device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    return {
        "config": asdict(config) if is_dataclass(config) else dict(vars(config)),
        "world_size": dist.world_size,
        "device": str(dist.device.type),
        "device_name": device_name,
        # Rank 0's high-water mark of tensor memory on its GPU (what OOMs first); None on CPU.
        "peak_gpu_mib": (torch.cuda.max_memory_allocated(dist.device) / 2**20 if dist.device.type == "cuda" else None),
        "threads_per_process": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
        "hostname": socket.gethostname(),
        "command": " ".join(sys.argv),
    }


class RunRecorder:
    """The run directory: one ``metrics.jsonl`` line per epoch, ``summary.json`` at the end.

    On resume from epoch ``start_epoch``, lines of later epochs (written after the checkpoint,
    before a crash) are dropped, so the file always matches the model state.

    With ``tensorboard=True`` (``--tensorboard``) rank 0 also writes every number of each
    epoch's row (the same keys as metrics.jsonl, e.g. losses, accuracies, ``lr``,
    ``samples_per_s``; nested dicts as ``outer/inner``) as TensorBoard scalars at step
    ``epoch``, in ``out_dir/tensorboard/``: ``tensorboard --logdir OUT_DIR``.
    """

    def __init__(self, out_dir: Path, dist: DistInfo, start_epoch: int = 0, tensorboard: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.plots_dir = self.out_dir / "plots"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.dist = dist
        self._tensorboard = None
        if dist.is_main:
            self.plots_dir.mkdir(parents=True, exist_ok=True)
            kept = [row for row in self.read_metrics() if row.get("epoch", 0) < start_epoch]
            write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            if tensorboard:
                self._tensorboard = tensorboard_writer(self.out_dir / TENSORBOARD_DIR, start_epoch)

    def read_metrics(self) -> list[dict[str, Any]]:
        """All epoch rows written so far."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Append one epoch's metrics, flushed to disk so a crash loses nothing written."""
        if not self.dist.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tensorboard is not None:
            for tag, value in scalars(row):
                self._tensorboard.add_scalar(tag, value, global_step=row["epoch"])
            self._tensorboard.flush()  # visible in TensorBoard while the run goes on

    def write_text(self, name: str, text: str) -> None:
        """Write a text file (e.g. a Markdown table) in the run directory (rank 0)."""
        if self.dist.is_main:
            write_text_atomic(self.out_dir / name, text)

    def write_summary(self, summary: dict[str, Any], config: Any) -> None:
        """``summary.json``: the final metrics plus ``run_info`` (config, versions, commit)."""
        if self.dist.is_main:
            write_json_atomic(self.out_dir / "summary.json", {**summary, **run_info(self.dist, config)})
        self.close()

    def close(self) -> None:
        """Close the TensorBoard writer, if any (``write_summary`` does it)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
