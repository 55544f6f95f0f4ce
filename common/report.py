"""What a run leaves behind: rank-0 logs, progress bars, metrics.jsonl, summary.json, plots.

Only rank 0 writes; every function here is safe to call on all ranks.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
from tqdm import tqdm

from common.dist import DistInfo
from common.errors import UserError
from common.figures import pyplot, save_figure
from common.files import write_text_atomic

T = TypeVar("T")


def get_logger(name: str, dist: DistInfo) -> logging.Logger:
    """A logger that prints on rank 0 and stays quiet (warnings only) elsewhere."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if dist.is_main else logging.WARNING)
    return logger


def progress(iterable: Iterable[T], dist: DistInfo, total: int | None = None,
             desc: str = "") -> Iterator[T]:
    """A tqdm bar on rank 0 (to stderr, refreshed at most every 2 s); plain iteration elsewhere."""
    disable = not dist.is_main or os.environ.get("NO_PROGRESS") == "1"
    return iter(tqdm(iterable, total=total, desc=desc, disable=disable, leave=False,
                     mininterval=2.0, dynamic_ncols=True))


def optional_extra(what: str, fn: Callable[[], T], log: logging.Logger) -> T | None:
    """Run work that only adds to a finished run (plots, baselines) and return its result; on
    failure log one warning naming ``what`` and return None.

    Call it on one rank, after the run's last collective and after its results are written:
    no peer then waits on the extra (a slow fit cannot time out a collective), and a crash in
    it neither costs the results nor fails the job (torchrun would restart a finished run and
    meet the same crash again).
    """
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - an extra must never cost the run its exit status
        log.warning("%s failed, the run's results are unaffected: %s: %s", what,
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None


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
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_info(dist: DistInfo, config: Any) -> dict[str, Any]:
    """Everything needed to reproduce or compare a run (recorded in summary.json)."""
    device_name = (torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda"
                   else platform.processor() or platform.machine())
    return {
        "config": asdict(config) if is_dataclass(config) else dict(vars(config)),
        "world_size": dist.world_size,
        "device": str(dist.device.type),
        "device_name": device_name,
        # Rank 0's high-water mark of tensor memory on its GPU (what OOMs first); None on CPU.
        "peak_gpu_mib": (torch.cuda.max_memory_allocated(dist.device) / 2**20
                         if dist.device.type == "cuda" else None),
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

    def __init__(self, out_dir: Path, dist: DistInfo, start_epoch: int = 0,
                 tensorboard: bool = False) -> None:
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

    def write_json(self, name: str, obj: Any) -> None:
        """Write ``obj`` as ``name`` in the run directory (rank 0, atomically)."""
        if self.dist.is_main:
            write_json_atomic(self.out_dir / name, obj)

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


TENSORBOARD_DIR = "tensorboard"


def tensorboard_available() -> bool:
    """True when the ``tensorboard`` package (needed by ``--tensorboard``) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_writer(log_dir: Path, start_epoch: int = 0):
    """A ``torch.utils.tensorboard.SummaryWriter`` for ``log_dir``, imported only here, so that
    nothing else needs the optional package. On resume, events at steps >= ``start_epoch``
    (written after the checkpoint, before a crash) are hidden, as in metrics.jsonl."""
    if not tensorboard_available():
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or pip install -e '.[tensorboard]')")
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


def plot_curves(rows: list[dict[str, Any]], panels: dict[str, list[str]], path: Path,
                title: str = "") -> None:
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
