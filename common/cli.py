"""The command-line arguments every program shares, and their validation."""
from __future__ import annotations

import argparse
from pathlib import Path

from common.dist import DEFAULT_TIMEOUT_S
from common.config import RunConfig
from common.parallel import STRATEGIES


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the description's line breaks (its examples)."""


def make_parser(description: str, *, epochs: int, batch_size: int, lr: float,
                data_dir: str, out_dir: str, eval_only: str | None = None) -> argparse.ArgumentParser:
    """A parser with the shared arguments; programs add their own after it.

    ``eval_only``: the help of ``--eval-only`` (common/evaluation.py), for a program that has it.

    ``--batch-size`` is the *global* batch: with N processes each takes batch_size / N, so the
    optimisation (and the result) does not depend on how many processes run it.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=_Formatter)
    shared = parser.add_argument_group("shared by every program")
    shared.add_argument("--data-dir", type=Path, default=Path(data_dir),
                        help="folder with the dataset (downloaded there if absent and possible)")
    shared.add_argument("--out-dir", type=Path, default=Path(out_dir),
                        help="run directory: metrics.jsonl, summary.json, checkpoint.pt, plots/")
    shared.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    shared.add_argument("--batch-size", type=int, default=batch_size,
                        help="global batch size, split evenly across processes")
    shared.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    shared.add_argument("--seed", type=int, default=0, help="seed for weights, splits, data order")
    shared.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="continue from a checkpoint: alone, the one in --out-dir if any "
                             "(safe to pass on every torchrun restart); or a file / run dir")
    shared.add_argument("--overwrite", action="store_true",
                        help="replace the run --out-dir holds (its checkpoints, metrics, summary, "
                             "plots); without it a launch into a run directory needs --resume")
    shared.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto = CUDA if available (NCCL), else CPU (gloo)")
    shared.add_argument("--strategy", default="ddp", choices=list(STRATEGIES),
                        help="ddp: replicate the model; fsdp: shard parameters, gradients and "
                             "optimizer state across processes (FSDP2)")
    shared.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="how long a collective waits for the other ranks before failing")
    shared.add_argument("--tensorboard", action="store_true",
                        help="also log each epoch's metrics, learning rate and samples/s as "
                             "TensorBoard scalars in OUT_DIR/tensorboard (rank 0; needs the "
                             "tensorboard package: pip install -e '.[tensorboard]')")
    if eval_only is not None:
        shared.add_argument("--eval-only", action="store_true", help=eval_only)
    return parser


def check_shared_args(args: argparse.Namespace) -> None:
    """Reject impossible shared arguments with a message that says what to change
    (``common.config.RunConfig`` holds the checks; for programs without a Config of their own)."""
    RunConfig.from_args(args)
