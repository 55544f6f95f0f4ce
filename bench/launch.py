"""Start a program the way users do, from another program: plain ``python`` or ``torchrun``.

Used by bench/ (bench.py, peer.py) to launch the training programs and its own workers as
child processes, and by tests/launch.py, which adds the suite's settings on top: one copy of
the environment cleaning and of the torchrun command line.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

# What torchrun sets for its workers: a child started from inside a torchrun worker (or from a
# shell that exported them) must not inherit them, or it would try to join the parent's job.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without torchrun's variables, with progress bars off and
    unbuffered output (so a child's lines arrive in order), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update({"NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def launch_command(
    script: Path | str, args: list[str], nproc: int = 1, torchrun_args: list[str] | None = None
) -> list[str]:
    """The command line running ``script``: one plain process (no torchrun variables: the
    single-process path) when ``nproc`` is 1 and no ``torchrun_args`` are given, else torchrun
    with ``nproc`` processes and a rendezvous on a free local port."""
    if nproc == 1 and not torchrun_args:
        return [sys.executable, str(script), *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        *(torchrun_args or []),
        str(script),
        *args,
    ]
