"""A worker for tests/test_faults.py: forms the process group, then idles outside any collective.

``python restart_probe.py OUT``: after joining, each rank leaves a ``started.RANK.PID`` marker and,
unless ``OUT/killed`` exists, sleeps (as a rank loading data or writing a checkpoint would).
While it sleeps the test kills the other node's worker: that node's agent restarts after a
*failure*, this node's agent after a *membership change*, so the two count restarts
differently (TORCHELASTIC_RESTART_COUNT). The restarted ranks must still form one group; rank 0
records every rank's count in ``OUT/result.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from common.agree import all_gather_object, barrier
from common.dist import distributed
from common.errors import run_main


def main() -> None:
    out = Path(sys.argv[1])
    with distributed("cpu", timeout_s=30) as dist:
        counts = all_gather_object(os.environ.get("TORCHELASTIC_RESTART_COUNT"), dist)
        (out / f"started.{dist.rank}.{os.getpid()}").write_text(json.dumps(counts))
        if not (out / "killed").exists():
            time.sleep(120)
        barrier(dist)
        if dist.is_main:
            (out / "result.json").write_text(json.dumps({"restart_counts": counts}))


if __name__ == "__main__":
    run_main(main)
