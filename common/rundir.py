"""Who may write a run directory: one launch at a time, and only the run it holds.

A run directory holds a run's results (``RUN_FILES``). A launch may write into it when it is
empty, when the launch continues that run (``--resume``: same program; the settings are checked
against the checkpoint's in common/run.py), or when the user asks for it to be replaced
(``--overwrite``). Anything else stops every rank with one line before a file is touched: a
second ``python housing/train.py`` would otherwise overwrite a finished run's metrics, summary
and checkpoints without a word.

While a launch runs, rank 0 holds an exclusive lock on ``LOCK`` (``fcntl.flock``: released by
the kernel when the process ends, however it ends, so a killed run never leaves a stale lock and
torchrun's restarted workers take it again). The lock file also records which program owns the
directory. The decision is rank 0's (only rank 0 writes the directory) and every rank learns it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import IO

from common.agree import stop_if_any_rank_failed
from common.dist import DistInfo

LOCK = ".run.lock"
# What makes a folder a run directory, and what --overwrite removes (nothing else: a user's own
# files in the folder stay).
RUN_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "summary.json")
OWNED = (*RUN_FILES, "results.md", "eval.json", "detector.pt", "plots", "tensorboard")

_held: dict[Path, IO[str]] = {}  # the locks this process holds, by directory


def claim_run_dir(out_dir: Path, program: str, dist: DistInfo, resume: bool, overwrite: bool) -> None:
    """Make this launch the one writer of ``out_dir`` for ``program``, or stop every rank.

    Call on every rank before anything is written (a collective). Refused, with one ``error:``
    line: a directory another launch is writing; one holding a run, unless ``resume`` (a run of
    the same program) or ``overwrite`` (its run files are then removed).
    """
    problem = _claim(Path(out_dir), program, resume, overwrite) if dist.is_main else None
    stop_if_any_rank_failed(problem, dist)


def _claim(out_dir: Path, program: str, resume: bool, overwrite: bool) -> str | None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / LOCK
    if out_dir not in _held:
        handle = open(lock, "a+")  # noqa: SIM115 - held open for the life of the process
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _read_owner(handle.read())
            handle.close()
            return (
                f"--out-dir {out_dir} is being written by another launch ({holder.get('program', '?')}, "
                f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}); wait for it to end or "
                "choose another --out-dir"
            )
        except OSError as err:  # a filesystem without locks (some network mounts): run unlocked
            print(
                f"warning: --out-dir {out_dir} cannot be locked ({err.strerror}); a second launch "
                "into it would not be refused",
                file=sys.stderr,
                flush=True,
            )
        handle.seek(0)
        owner = _read_owner(handle.read()).get("program")
        _held[out_dir] = handle
    else:
        owner = program
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if found and overwrite:
        for name in OWNED:
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    elif found and not resume:
        what = f"a {owner} run" if owner else "a run"
        return (
            f"--out-dir {out_dir} already holds {what} ({', '.join(found)}); pass --resume to "
            "continue it, --overwrite to replace it, or choose another --out-dir"
        )
    elif found and owner not in (None, program):
        return (
            f"--out-dir {out_dir} holds a run of {owner}, not of {program}; --resume continues a "
            f"run of the same program: choose another --out-dir"
        )
    handle = _held[out_dir]
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"program": program, "pid": os.getpid(), "host": socket.gethostname()}) + "\n")
    handle.flush()
    return None


def _read_owner(text: str) -> dict:
    try:
        owner = json.loads(text or "{}")
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}
