"""Fault injection for real: SIGKILL one worker of a running torchrun job, corrupt checkpoints."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.launch import REPO, child_env, free_port


def worker_pids(agent_pid: int) -> list[int]:
    """The worker processes torchrun's agent started (its direct children)."""
    out = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True)
    return sorted(int(pid) for pid in out.stdout.split())


def run_and_kill_one_worker(script: str, args: list[str], out_dir: Path, nproc: int = 2,
                            timeout: float = 240) -> dict:
    """Launch with ``--max-restarts=1 --resume``, SIGKILL rank 1's process after the first
    checkpoint appears, let torchrun restart the job, and return the final summary.json plus
    how long the job took to recover and finish.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           str(REPO / script), *args, "--out-dir", str(out_dir), "--resume"]
    agent = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    checkpoint = out_dir / "checkpoint.pt"
    while not checkpoint.exists():
        if agent.poll() is not None or time.time() > deadline:
            out, err = agent.communicate()
            raise AssertionError(f"no checkpoint appeared before the job ended:\n{err[-3000:]}")
        time.sleep(0.05)
    killed_epoch = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])["epoch"]
    victims = worker_pids(agent.pid)
    assert len(victims) == nproc, f"expected {nproc} workers, found {victims}"
    os.kill(victims[-1], signal.SIGKILL)
    killed_at = time.time()
    out, err = agent.communicate(timeout=max(1.0, deadline - time.time()))
    assert agent.returncode == 0, f"job did not recover (exit {agent.returncode}):\n{err[-3000:]}"
    summary = json.loads((out_dir / "summary.json").read_text())
    return {"summary": summary, "recovery_s": time.time() - killed_at,
            "killed_after_epoch": killed_epoch, "stderr": err}


def truncate(path: Path) -> None:
    """Cut a file to half its size, as a crash mid-copy or a full disk would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def run_and_terminate(script: str, args: list[str], out_dir: Path, nproc: int = 2,
                      sig: signal.Signals = signal.SIGTERM, delay_s: float = 0.2,
                      timeout: float = 240) -> dict:
    """Launch under torchrun, send ``sig`` to torchrun's agent (as a scheduler does) ``delay_s``
    after the first checkpoint exists (into the next epoch), and return how the job ended and
    how long it took to exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           str(REPO / script), *args, "--out-dir", str(out_dir)]
    agent = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not (out_dir / "checkpoint.pt").exists():
        if agent.poll() is not None or time.time() > deadline:
            out, err = agent.communicate()
            raise AssertionError(f"no checkpoint appeared before the job ended:\n{err[-3000:]}")
        time.sleep(0.02)
    time.sleep(delay_s)
    agent.send_signal(sig)
    sent = time.time()
    out, err = agent.communicate(timeout=max(1.0, deadline - time.time()))
    return {"returncode": agent.returncode, "exit_s": time.time() - sent, "stdout": out, "stderr": err}
