"""What a person watching a run sees: rank-0 log lines and progress bars, and extras that
may fail with a warning rather than cost the run.

Every function here is safe to call on all ranks: only rank 0 prints.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

from common.dist import DistInfo

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


def progress(iterable: Iterable[T], dist: DistInfo, total: int | None = None, desc: str = "") -> Iterator[T]:
    """A tqdm bar on rank 0 (to stderr, refreshed at most every 2 s); plain iteration elsewhere."""
    disable = not dist.is_main or os.environ.get("NO_PROGRESS") == "1"
    return iter(
        tqdm(iterable, total=total, desc=desc, disable=disable, leave=False, mininterval=2.0, dynamic_ncols=True)
    )


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
        log.warning(
            "%s failed, the run's results are unaffected: %s: %s",
            what,
            type(err).__name__,
            str(err).splitlines()[0] if str(err) else "",
        )
        return None
