"""Fault injection for real: SIGKILL one worker of a running torchrun job, corrupt checkpoints."""

from __future__ import annotations

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


def kill_then_preempt(
    script: str, args: list[str], out_dir: Path, nproc: int = 2, delay_s: float = 0.0, timeout: float = 240
) -> dict:
    """Two faults in one torchrun job (``--max-restarts=1 --resume``): SIGKILL rank 1's worker
    after the first checkpoint; once torchrun has restarted the workers and they have saved a
    checkpoint of their own, wait ``delay_s`` (into the next epoch) and send SIGTERM to the
    agent, as a scheduler pre-empting the job does. Returns how the job ended and how long it
    took to exit after the signal.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--max-restarts=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        str(REPO / script),
        *args,
        "--out-dir",
        str(out_dir),
        "--resume",
    ]
    agent = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    checkpoint = out_dir / "checkpoint.pt"
    wait_for(checkpoint.exists, [agent], deadline, "a first checkpoint")
    killed_group = worker_pids(agent.pid)
    assert len(killed_group) == nproc, f"expected {nproc} workers, found {killed_group}"
    os.kill(killed_group[-1], signal.SIGKILL)
    wait_for_restart_and_save([agent], killed_group, nproc, [checkpoint], deadline)
    time.sleep(delay_s)
    agent.send_signal(signal.SIGTERM)
    sent = time.time()
    out, err = agent.communicate(timeout=max(1.0, deadline - time.time()))
    return {"returncode": agent.returncode, "exit_s": time.time() - sent, "stdout": out, "stderr": err}


def wait_for_restart_and_save(
    agents: list[subprocess.Popen], killed_group: list[int], workers: int, checkpoints: list[Path], deadline: float
) -> None:
    """Wait until torchrun has replaced every worker of ``killed_group`` (``workers`` new
    processes under ``agents``), then until the restarted job has written one of ``checkpoints``."""

    def restarted() -> bool:
        pids = [pid for agent in agents for pid in worker_pids(agent.pid)]
        return len(pids) == workers and not set(pids) & set(killed_group)

    wait_for(restarted, agents, deadline, "the restarted workers")
    restarted_at = time.time()
    wait_for(
        lambda: any(_mtime(c) > restarted_at for c in checkpoints),
        agents,
        deadline,
        "a checkpoint of the restarted job",
    )


def _mtime(path: Path) -> float:
    """``path``'s modification time, 0 while it is missing (a checkpoint is briefly absent
    between the two renames that rotate it, common/checkpoint.py)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def truncate(path: Path) -> None:
    """Cut a file to half its size, as a crash mid-copy or a full disk would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --- several "nodes" on this machine: one torchrun agent each, joined by c10d rendezvous ------


def start_nodes(script: str, args_per_node: list[list[str]], max_restarts: int = 1) -> list[subprocess.Popen]:
    """One torchrun agent per entry of ``args_per_node`` (1 worker each), as on separate hosts.

    The agents share an endpoint and a run id, as ``scripts/run_multi_node.sh`` on every node
    would; each gets its own program arguments (e.g. its own ``--out-dir``, a node's disk).
    """
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for args in args_per_node:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={len(args_per_node)}",
            "--nproc_per_node=1",
            f"--max-restarts={max_restarts}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            "--rdzv-id=faults",
            str(REPO / script),
            *args,
        ]
        nodes.append(
            subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return nodes


def worker_with_rank(nodes: list[subprocess.Popen], rank: int) -> int:
    """The pid of the worker that torchrun started with global ``RANK=rank``, on whichever node."""
    for node in nodes:
        for pid in worker_pids(node.pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
    raise AssertionError(f"no worker with RANK={rank} among {[worker_pids(n.pid) for n in nodes]}")


def wait_for(condition, nodes: list[subprocess.Popen], deadline: float, what: str) -> None:
    """Poll ``condition()`` until true; fail with the nodes' output if they end or time runs out."""
    while not condition():
        if any(node.poll() is not None for node in nodes) or time.time() > deadline:
            finish_nodes(nodes, 5)
            raise AssertionError(f"{what} did not happen before the job ended")
        time.sleep(0.05)


def finish_nodes(nodes: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """Wait for every agent; ``(exit code, stderr)`` each. Agents still running are killed."""
    results = []
    deadline = time.time() + timeout
    for node in nodes:
        try:
            _, err = node.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for pid in worker_pids(node.pid):
                os.kill(pid, signal.SIGKILL)
            node.kill()
            _, err = node.communicate()
            err += "\n[test] killed: the job did not finish in time"
        results.append((node.returncode, err))
    return results


def kill_node_workers(
    script: str,
    args_per_node: list[list[str]],
    kill_ranks: list[int],
    checkpoint_dirs: list[Path],
    timeout: float = 180,
) -> dict:
    """Two nodes train with ``--max-restarts=len(kill_ranks) --resume``; SIGKILL the worker
    holding global rank ``kill_ranks[0]`` once the first checkpoint appears in any of
    ``checkpoint_dirs``, then each next rank once the restarted job has written a checkpoint
    of its own; return the seconds from the last kill to the end of the job and each node's
    exit code and stderr.
    """
    nodes = start_nodes(script, [[*args, "--resume"] for args in args_per_node], max_restarts=len(kill_ranks))
    deadline = time.time() + timeout
    checkpoints = [d / "checkpoint.pt" for d in checkpoint_dirs]
    wait_for(lambda: any(c.exists() for c in checkpoints), nodes, deadline, "a first checkpoint")
    killed_group: list[int] = []
    for rank in kill_ranks:
        if killed_group:  # every worker is a restarted one, and the restarted job has saved since
            wait_for_restart_and_save(nodes, killed_group, len(nodes), checkpoints, deadline)
        killed_group = [pid for node in nodes for pid in worker_pids(node.pid)]
        os.kill(worker_with_rank(nodes, rank), signal.SIGKILL)
        killed_at = time.time()
    results = finish_nodes(nodes, deadline - time.time())
    return {"recovery_s": time.time() - killed_at, "results": results}
