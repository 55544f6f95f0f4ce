"""The settings every program shares: the command-line flags (``make_parser``) and the frozen
dataclass they fill (``RunConfig``), declared and validated once.

Each program's ``Config`` is a frozen dataclass that subclasses ``RunConfig`` and adds what its
problem needs; ``kw_only`` lets the subclass add fields without defaults after the base's. A
Config checks itself when it is made (``__post_init__``): the shared fields here, then the
program's own ``check``. Every problem is a UserError that names the flag and says what to
change, so a bad command line stops before any process group, file or download exists.

``--eval-only`` rebuilds the evaluated run's Config from the one saved in its checkpoint
(``for_evaluation``): the data and model come from there, so nothing has to be repeated on the
command line; only the run options (where and how this launch runs) and the program's
``EVAL_OPTIONS`` come from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from common.dist import DEFAULT_TIMEOUT_S
from common.errors import UserError
from common.parallel import STRATEGIES
from common.tensorboard import tensorboard_available

# Where and how this launch runs, not what it trains: an --eval-only run keeps its own, and a
# --resume may change them.
RUN_OPTIONS = ("data_dir", "out_dir", "resume", "device", "strategy", "dist_timeout", "tensorboard", "overwrite")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The fields of ``make_parser``'s shared arguments (the same names as the flags)."""

    PROGRAM: ClassVar[str] = "program"  # names the program in checkpoints and messages
    EVAL_OPTIONS: ClassVar[tuple[str, ...]] = ()  # fields --eval-only takes from its command line
    # Fields a --resume may change besides RUN_OPTIONS: they touch no training (every other
    # field must equal the resumed run's, common/run.py).
    RESUME_OPTIONS: ClassVar[tuple[str, ...]] = ()

    data_dir: Path
    out_dir: Path
    epochs: int  # housing: an upper bound, early stopping may end sooner
    batch_size: int  # global samples per optimizer step, split across ranks
    lr: float  # peak learning rate
    seed: int = 0  # weights, splits, data order
    resume: str | None = None  # "auto", a checkpoint file or a run directory
    device: str = "auto"
    strategy: str = "ddp"  # "ddp" or "fsdp" (common.parallel)
    dist_timeout: float = DEFAULT_TIMEOUT_S  # seconds a collective waits for the other ranks
    tensorboard: bool = False  # rank 0 also writes metrics.jsonl's scalars for TensorBoard
    eval_only: bool = False  # evaluate the checkpoint named by --resume; no training
    overwrite: bool = False  # replace the run --out-dir holds (common/rundir.py)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must be in 0 .. 2**32 - 1 (NumPy's range), got {self.seed}")
        if self.dist_timeout <= 0:
            raise UserError(f"--dist-timeout must be positive, got {self.dist_timeout}")
        if self.tensorboard and not tensorboard_available():
            raise UserError(
                "--tensorboard needs the tensorboard package: pip install tensorboard "
                "(or pip install -e '.[tensorboard]')"
            )
        if self.eval_only and self.resume is None:
            raise UserError("--eval-only needs --resume (a run directory or checkpoint file)")
        if self.overwrite and self.resume is not None:
            raise UserError("--overwrite replaces the run in --out-dir and --resume continues it: pass one")
        _check_writable(Path(self.out_dir))
        self.check()

    def check(self) -> None:
        """The program's own constraints (override): raise UserError saying what to change."""

    def settings_changed_from(self, saved: dict[str, Any]) -> list[tuple[str, Any, Any]]:
        """``(field, this value, saved value)`` for every field that differs from ``saved`` (a
        checkpoint's ``config_dict``) and that a --resume may not change: the ones that shape
        the data or the optimisation."""
        free = {*RUN_OPTIONS, *self.RESUME_OPTIONS, "eval_only"}
        changed = []
        for name, value in config_dict(self).items():
            if name in free or name not in saved:
                continue
            old = tuple(saved[name]) if isinstance(saved[name], list) else saved[name]
            if value != old:
                changed.append((name, value, old))
        return changed

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> Self:
        """The Config of a parsed command line: every field named like a flag, then ``overrides``."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, **overrides})

    def for_evaluation(self, saved: dict[str, Any], source: str) -> Self:
        """The Config saved in checkpoint ``source`` (``config_dict``), with this launch's run
        options and ``EVAL_OPTIONS``; what --eval-only rebuilds the data and model from."""
        own = {name: getattr(self, name) for name in (*RUN_OPTIONS, *self.EVAL_OPTIONS)}
        plain = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
        try:
            return type(self)(**{**plain, **own, "eval_only": True})
        except TypeError as err:  # a field this version no longer has, or lacks a new one
            raise UserError(
                f"{source}: its config does not fit this version of {self.PROGRAM}/train.py ({err}); train again"
            ) from None


def _check_writable(out_dir: Path) -> None:
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out-dir {out_dir} is not writable ({existing} is not a writable folder)")


def config_dict(cfg: Any) -> dict[str, Any]:
    """A program's Config as a dict of plain values for a checkpoint: paths become strings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the description's line breaks (its examples)."""


def make_parser(description: str, defaults: dict[str, Any], eval_only: str | None = None) -> argparse.ArgumentParser:
    """A parser with the shared arguments; programs add their own after it.

    ``defaults``: the program's ``epochs``, ``batch_size``, ``lr``, ``data_dir`` and ``out_dir``
    (its DEFAULTS; a preset's values may replace them with ``parser.set_defaults``).
    ``eval_only``: the help of ``--eval-only`` (common/run.py), for a program that has it.

    ``--batch-size`` is the *global* batch: with N processes each takes batch_size / N, so the
    optimisation (and the result) does not depend on how many processes run it.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=_Formatter)
    shared = parser.add_argument_group("shared by every program")
    shared.add_argument(
        "--data-dir",
        type=Path,
        default=Path(defaults["data_dir"]),
        help="folder with the dataset (downloaded there if absent and possible)",
    )
    shared.add_argument(
        "--out-dir",
        type=Path,
        default=Path(defaults["out_dir"]),
        help="run directory: metrics.jsonl, summary.json, checkpoint.pt, plots/",
    )
    shared.add_argument("--epochs", type=int, default=defaults["epochs"], help="training epochs")
    shared.add_argument(
        "--batch-size",
        type=int,
        default=defaults["batch_size"],
        help="global batch size, split evenly across processes",
    )
    shared.add_argument("--lr", type=float, default=defaults["lr"], help="peak learning rate")
    shared.add_argument("--seed", type=int, default=0, help="seed for weights, splits, data order")
    shared.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="PATH",
        help="continue from a checkpoint: alone, the one in --out-dir if any "
        "(safe to pass on every torchrun restart); or a file / run dir",
    )
    shared.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run --out-dir holds (its checkpoints, metrics, summary, "
        "plots); without it a launch into a run directory needs --resume",
    )
    shared.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto = CUDA if available (NCCL), else CPU (gloo)",
    )
    shared.add_argument(
        "--strategy",
        default="ddp",
        choices=list(STRATEGIES),
        help="ddp: replicate the model; fsdp: shard parameters, gradients and optimizer state across processes (FSDP2)",
    )
    shared.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="how long a collective waits for the other ranks before failing",
    )
    shared.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log each epoch's metrics, learning rate and samples/s as "
        "TensorBoard scalars in OUT_DIR/tensorboard (rank 0; needs the "
        "tensorboard package: pip install -e '.[tensorboard]')",
    )
    if eval_only is not None:
        shared.add_argument("--eval-only", action="store_true", help=eval_only)
    return parser
