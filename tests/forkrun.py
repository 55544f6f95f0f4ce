"""A stand-in for torchrun in tests: the ranks of a run are forked from a server that imported
the programs once.

Why: a small 2-process run under ``torchrun --nproc_per_node=2`` is nearly all start-up (the
agent and every worker import torch, pandas and scikit-learn, and torch's optimizers import
torch._dynamo), and the suite launches the programs about a hundred times; README.md, Tests,
gives the CPU time this saves. The server is Python's ``forkserver``: it imports the modules below once and never runs
a torch operation, so every rank is forked from a clean, single-threaded process (forking a
process whose OpenMP pool has run is how children hang).

What it keeps of torchrun, which is what the programs see of it:
- each rank runs the script as ``__main__`` with its arguments, in the repository root, with
  the environment torchrun gives a worker: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (rank 0 hosts the store, as
  ``common/rendezvous.py`` does whenever torchrun's agent does not); one plain process gets none of
  them (the single-process path);
- when one rank fails, the others are stopped (SIGTERM, then SIGKILL), and the run's exit
  code is 1, as torchrun's is; a single process exits with its own code;
- a run that outlives ``timeout`` is killed and raises ``subprocess.TimeoutExpired``.

What it leaves out: the agent, its rendezvous and restarts, signals sent to the agent, several
nodes. The tests of those (tests/test_faults.py, test_preempt.py, test_scripts.py,
test_slurm.py, the docs' commands) launch real torchrun.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.launch import free_port

PRELOAD = ["tests.forkrun_preload"]  # imported once by the server; a rank imports the rest itself
STOP_GRACE_S = 10  # between SIGTERM and SIGKILL for the ranks still running after a failure
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _run_rank(script: str, args: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    """The body of one rank (in the forked child): run ``script`` as ``__main__`` and exit with its code."""
    for fd, path in ((1, stdout), (2, stderr)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [script, *args]
    sys.path[0:0] = [str(Path(script).parent)]  # as `python script` puts the script's folder first
    if os.environ.get("FORKRUN_IMPORTS"):
        _report_imports_at_exit(os.environ["FORKRUN_IMPORTS"])
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if isinstance(stop.code, int) or stop.code is None:
            code = stop.code or 0
        else:  # sys.exit("message"): Python prints it and exits 1
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught exception: a traceback and exit 1, like python
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _report_imports_at_exit(path: str) -> None:
    """Append to ``path`` the modules this rank imported itself (candidates for PRELOAD).

    The programs leave through ``os._exit`` (common/errors.py), so the report hooks that."""
    before, real_exit = set(sys.modules), os._exit

    def exit_and_report(code: int) -> None:
        with open(path, "a") as f:
            f.writelines(f"{name}\n" for name in sorted(set(sys.modules) - before))
        real_exit(code)

    os._exit = exit_and_report


def rank_env(env: dict[str, str], rank: int, nproc: int, port: int, nodes: int = 1) -> dict[str, str]:
    """``env`` plus what torchrun sets for the worker with global rank ``rank`` of ``nproc``,
    the ranks spread evenly over ``nodes`` nodes in order (ranks 0..k-1 on node 0, and so on)."""
    per_node = nproc // nodes
    return {
        **env,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank % per_node),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(per_node),
        "GROUP_RANK": str(rank // per_node),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def fork_run(
    script: Path | str,
    args: list[str],
    nproc: int,
    env: dict[str, str],
    cwd: Path | str,
    timeout: float,
    port: int,
    torchrun: bool | None = None,
    nodes: int = 1,
) -> subprocess.CompletedProcess:
    """Run ``script`` as ``nproc`` ranks with torchrun's environment, or as one plain process
    (``torchrun`` False, the default for ``nproc`` 1); wait at most ``timeout`` seconds.

    ``nodes`` > 1 gives the ranks the environment of as many torchrun agents on separate hosts
    (``LOCAL_WORLD_SIZE`` ``nproc // nodes``, so each also takes that node's share of threads).

    Returns what ``subprocess.run(..., capture_output=True, text=True)`` would: the ranks'
    stdout and stderr, each concatenated in rank order.
    """
    torchrun = nproc > 1 if torchrun is None else torchrun
    ctx = _forkserver()
    command = ["forkrun", f"--nproc_per_node={nproc}", str(script), *args]
    with tempfile.TemporaryDirectory(prefix="forkrun-") as logs:
        ranks = []
        for rank in range(nproc):
            rank_vars = rank_env(env, rank, nproc, port, nodes) if torchrun else env
            paths = (f"{logs}/{rank}.out", f"{logs}/{rank}.err")
            process = ctx.Process(
                target=_run_rank, args=(str(script), list(args), str(cwd), rank_vars, *paths), daemon=True
            )
            process.start()
            ranks.append((process, paths))
        deadline = time.monotonic() + timeout
        timed_out, failed_at = False, None
        while any(p.is_alive() for p, _ in ranks):
            if failed_at is None and any(p.exitcode not in (None, 0) for p, _ in ranks):
                failed_at = time.monotonic()  # torchrun stops the others when one fails
                _signal_alive(ranks, signal.SIGTERM)
            if failed_at is not None and time.monotonic() > failed_at + STOP_GRACE_S:
                _signal_alive(ranks, signal.SIGKILL)
            if time.monotonic() > deadline:
                timed_out = True
                _signal_alive(ranks, signal.SIGKILL)
            multiprocessing.connection.wait([p.sentinel for p, _ in ranks if p.is_alive()], timeout=0.05)
        for process, _ in ranks:
            process.join()
        stdout = "".join(_read(out) for _, (out, _) in ranks)
        stderr = "".join(_read(err) for _, (_, err) in ranks)
    if timed_out:
        raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr)
    codes = [process.exitcode for process, _ in ranks]
    code = int(any(codes)) if torchrun else codes[0]
    return subprocess.CompletedProcess(command, code, stdout, stderr)


def fork_command(
    cmd: list[str], *, cwd: Path | str, env: dict[str, str], timeout: float, **_: object
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, ...)`` for a program's command line, with the ranks forked.

    ``cmd`` is ``python SCRIPT ARGS...`` or ``python -m torch.distributed.run OPTIONS SCRIPT
    ARGS...``; torchrun's options are read by torchrun's own parser, so one it would refuse fails
    here too. Only what this module emulates is accepted: one node, no restarts.
    """
    if cmd[1:3] != ["-m", "torch.distributed.run"]:
        return fork_run(cmd[1], cmd[2:], 1, env, cwd, timeout, free_port())
    from torch.distributed.run import get_args_parser, parse_min_max_nnodes

    options = get_args_parser().parse_args(cmd[3:])
    if parse_min_max_nnodes(options.nnodes) != (1, 1) or options.max_restarts:
        raise ValueError(f"forkrun runs one node without restarts, not: {' '.join(cmd)}")
    nproc = int(options.nproc_per_node)
    return fork_run(
        options.training_script, options.training_script_args, nproc, env, cwd, timeout, free_port(), torchrun=True
    )


def _read(path: str) -> str:
    """A rank's captured output; empty if the rank died before it could open the file."""
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _signal_alive(ranks, sig: signal.Signals) -> None:
    for process, _ in ranks:
        if process.is_alive():
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                pass
