"""Run programs the way users do (plain python or torchrun) from tests, with time limits;
read what the runs left behind. The command lines and the cleaned environment are
bench/launch.py's; this adds the suite's settings (one thread per process) and
tests/forkrun.py's fast stand-in for torchrun."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import torch

from bench import launch
from bench.launch import free_port
from tests import forkrun

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child program: no torchrun variables, no progress bars, one
    thread per process (the suite runs on 2 shared cores)."""
    return launch.child_env({"OMP_NUM_THREADS": "1", **(extra or {})})


def run_program(
    script: str,
    args: list[str],
    nproc: int = 1,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    nodes: int = 1,
) -> subprocess.CompletedProcess:
    """Run ``script`` (a path relative to the repo) as 1 plain process or ``nproc`` ranks.

    The ranks are forked with torchrun's environment by tests/forkrun.py, which starts them
    in a fraction of the ~13 CPU-seconds a real torchrun launch costs here; ``nproc=1`` gets no
    torchrun variables (the single-process path). Returns the completed process (stdout and
    stderr captured); raises ``subprocess.TimeoutExpired`` on timeout, which is how a hang
    shows up in a test. ``nodes`` > 1 spreads the ranks over as many emulated hosts (their
    environment only). Tests of torchrun itself use :func:`run_torchrun`.
    """
    return forkrun.fork_run(REPO / script, args, nproc, child_env(env), REPO, timeout, free_port(), nodes=nodes)


def run_torchrun(
    script: str,
    args: list[str],
    nproc: int = 1,
    timeout: float = 120,
    torchrun_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """:func:`run_program` through a real launch: ``python script`` for 1 process, else torchrun."""
    cmd = launch.launch_command(REPO / script, args, nproc, torchrun_args)
    return subprocess.run(cmd, cwd=REPO, env=child_env(env), capture_output=True, text=True, timeout=timeout)


def error_messages(stderr: str) -> list[tuple[str, str]]:
    """``(rank, message)`` for every ``error: ...`` our ranks printed, rank "0" unprefixed.

    Parsed by markers rather than lines: torchrun relays the workers' output and two ranks'
    messages can arrive on one line.
    """
    pattern = re.compile(r"(?:\[rank (\d+)\] )?error: (.*?)(?=(?:\[rank \d+\] )?error: |\n|$)")
    return [(rank or "0", message) for rank, message in pattern.findall(stderr)]


# FSDP reduce-scatters gradients where DDP all-reduces them, and one process sums in yet another
# order: float32 rounding may differ in the last bits and a few optimizer steps amplify that
# (seen: <= 2e-8 absolute). A wrong gradient (unaveraged, a rank or a shard missing) or a
# misplaced shard is off by 1e-2 or more.
SAME_WEIGHTS = {"rtol": 1e-4, "atol": 1e-5}


def checkpoint_weights(run_dir: Path, key: str = "model") -> dict:
    """A full state dict from a run's newest checkpoint (written under either strategy)."""
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)[key]


def assert_same_weights(run_dir: Path, reference_dir: Path, key: str = "model") -> None:
    """The two runs' newest checkpoints hold the same tensors under ``key``, to float tolerance."""
    got, want = checkpoint_weights(run_dir, key), checkpoint_weights(reference_dir, key)
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], **SAME_WEIGHTS, msg=lambda message, name=name: f"{key} {name}: {message}"
        )


def resume_copy(run_dir: Path, dest: Path) -> Path:
    """A fresh run dir holding ``run_dir``'s previous checkpoint (one epoch before its end)."""
    dest.mkdir(parents=True)
    shutil.copy(Path(run_dir) / "checkpoint.prev.pt", dest / "checkpoint.pt")
    return dest


def event_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in ``log_dir``, as tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
