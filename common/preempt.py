"""Pre-emption: on SIGTERM or SIGUSR1, finish the step, agree, checkpoint the step, leave.

Schedulers stop jobs politely: SLURM sends SIGTERM (or the signal asked for with
``--signal=USR1@90``) some time before it kills a job, and torchrun's agent, when it gets
SIGTERM, SIGINT, SIGHUP or SIGQUIT (plus any signal named in ``--signals-to-handle``), sends
the same signal to every worker and waits ``--shutdown-timeout`` (30 s by default) before
SIGKILL. A long epoch would lose everything since its start.

``Preemption`` replaces the default "die now" of SIGTERM and SIGUSR1 with a flag. Training
loops call ``stop_requested()`` after every optimizer step, on every rank: it all-reduces the
flag (MAX), so all ranks stop after the *same* step even when only one got the signal. The
program then writes a checkpoint that records the step inside the epoch (``step_in_epoch``)
and each rank's running sums for the epoch's logged numbers (``EpochProgress``), and leaves
with ``PREEMPTED_EXIT``; ``--resume`` continues from that step and ends exactly where an
uninterrupted run ends (bit-identical on CPU at the same world size).

The check costs one 4-byte all-reduce per step over a gloo group (on CPU, the job's own group;
on GPU a separate CPU group, so the check never waits for the GPU's queue to drain).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from common.dist import DistInfo

# sysexits' EX_TEMPFAIL: "a temporary failure; retry later". Distinct from 0 (done), 1 (a crash),
# 2 (a problem the user must fix) and 128+N (killed by signal N): the job stopped cleanly and
# ``--resume`` continues it.
PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class EpochProgress:
    """Where training stands inside ``epoch``: what a pre-emption checkpoint records.

    ``step`` counts the optimizer steps done in the epoch; ``sums`` holds *this rank's* running
    sums behind the epoch's logged numbers (loss, counts; plus e.g. an augmentation generator's
    state), saved per rank so that the resumed epoch reports exactly the numbers an
    uninterrupted one would.
    """

    epoch: int
    step: int = 0
    sums: dict[str, Any] = field(default_factory=dict)


class Preemption:
    """Turns SIGTERM / SIGUSR1 into a stop after the current step, agreed by every rank.

    Create it on every rank at the same point (on GPU it forms a small gloo group, a
    collective); it installs its handlers in the main thread.
    """

    def __init__(self, dist: DistInfo, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.dist = dist
        self.received: signal.Signals | None = None
        self.received_at: float | None = None
        self.group = None
        if dist.is_distributed and dist.device.type != "cpu":
            self.group = tdist.new_group(backend="gloo")
        self._previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def release(self) -> None:
        """Give the signals back their earlier handlers (call when training is over): a
        SIGTERM during the final evaluation or the plots then stops the process at once instead
        of setting a flag no step will read."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        # Only note it: the step in progress finishes, then every rank learns of it together.
        if self.received is None:
            self.received, self.received_at = signal.Signals(signum), time.time()

    def stop_requested(self) -> bool:
        """True on every rank when any rank has received a signal. Call on all ranks together."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        if self.dist.is_distributed:
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def leave(self, checkpoint_dir: Path, progress: EpochProgress, log: Callable[[str], None] | None = None) -> None:
        """After the checkpoint is written: say where training stopped, exit ``PREEMPTED_EXIT``."""
        if log is not None and self.dist.is_main:
            what = self.received.name if self.received is not None else "a signal on another rank"
            waited = f" {time.time() - self.received_at:.1f} s after the signal" if self.received_at else ""
            log(
                f"pre-empted by {what}: stopped after step {progress.step} of epoch "
                f"{progress.epoch + 1}; checkpoint written to {checkpoint_dir}{waited}; "
                f"continue with --resume (exit status {PREEMPTED_EXIT})"
            )
        raise SystemExit(PREEMPTED_EXIT)  # run_main exits with this status
