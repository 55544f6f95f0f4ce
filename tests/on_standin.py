"""Run a program with its model and data on the stand-in GPU (tests/standin.py).

``python tests/on_standin.py PROGRAM.py ARGS...`` (or as the script of a forked launch): the
program's device is the stand-in's wherever it asks for one (``common.dist.resolve_device``),
so everything it places on ``dist.device`` lives off the host. With ``STANDIN_SYNCS=PATH`` it
writes the host-device crossings it counted to PATH (JSON) when the program exits. With
``STANDIN_SIGTERM_AT_STEP=N`` rank 0 sends itself SIGTERM just before the N-th pre-emption check
(the check after the N-th training step of this launch): a pre-emption at a known step.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script, its folder (tests/) comes first instead

from common import dist as common_dist  # noqa: E402
from common.preempt import Preemption  # noqa: E402
from tests.standin import DEVICE, standin_device  # noqa: E402


def main() -> None:
    script, sys.argv = str(REPO / sys.argv[1]), sys.argv[1:]
    common_dist.resolve_device = lambda requested, local_rank: DEVICE
    if os.environ.get("STANDIN_SIGTERM_AT_STEP") and os.environ.get("RANK", "0") == "0":
        signal_before_check(int(os.environ["STANDIN_SIGTERM_AT_STEP"]))
    report, real_exit = os.environ.get("STANDIN_SYNCS"), os._exit
    with standin_device() as device:

        def exit_and_report(code: int) -> None:  # the programs leave through os._exit
            if report:
                Path(report).write_text(json.dumps(device.syncs))
            real_exit(code)

        os._exit = exit_and_report
        runpy.run_path(script, run_name="__main__")


def signal_before_check(step: int) -> None:
    """SIGTERM to this process just before the ``step``-th ``Preemption.stop_requested``."""
    check, calls = Preemption.stop_requested, []

    def stop_requested(self: Preemption) -> bool:
        calls.append(step)
        if len(calls) == step:
            signal.raise_signal(signal.SIGTERM)
        return check(self)

    Preemption.stop_requested = stop_requested


if __name__ == "__main__":
    main()
