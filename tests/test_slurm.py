"""scripts/slurm.sbatch run for real: a one-node SLURM cluster (munge, slurmctld, slurmd) that
the test starts itself, a housing job submitted with sbatch, its result checked.

Debian's ``slurmctld``, ``slurmd`` and ``munge`` packages are installed by ``.ci/run`` (or here,
as root, if missing); the test skips only when they cannot be installed or started. Every
daemon gets its own socket, ports, state and log folder under a temporary directory, so
nothing of the machine's own configuration is used or changed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import REPO, child_env, free_port, run_program

PACKAGES = ["slurmctld", "slurmd", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol"]


def _have_binaries() -> bool:
    return all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES)


def _install() -> str | None:
    """Install the SLURM packages with apt-get if they are missing; a reason to skip, or None."""
    if _have_binaries():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get cannot run here (needs root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return f"{' '.join(cmd)} timed out"
        if done.returncode != 0:
            return f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}"
    return None if _have_binaries() else "SLURM binaries still missing after apt-get install"


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


SLURM_CONF = """\
ClusterName=torchdist-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node cluster (2 CPUs); yields the environment its clients need."""
    reason = _install()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, root=root, ctld_port=free_port(), slurmd_port=free_port()))
    key = root / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [
        [
            _sbin("munged"),
            "--force",
            f"--socket={root}/munge.sock",
            f"--key-file={key}",
            f"--pid-file={root}/munged.pid",
            f"--log-file={root}/munged.log",
            f"--seed-file={root}/munge.seed",
        ],
        [_sbin("slurmctld"), "-f", str(conf)],
        [_sbin("slurmd"), "-f", str(conf)],
    ]
    pid_files = [root / "munged.pid", root / "slurmctld.pid", root / "slurmd.pid"]
    try:
        for cmd, pid_file in zip(daemons, pid_files):
            started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
            if started.returncode != 0:
                pytest.skip(f"{Path(cmd[0]).name} did not start: {started.stderr.strip()[-300:]}")
            deadline = time.time() + 30
            while not pid_file.exists() and time.time() < deadline:
                time.sleep(0.1)
        deadline = time.time() + 90
        state = ""
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            logs = "".join(
                (root / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log") if (root / f).exists()
            )
            pytest.skip(f"the SLURM node did not become idle (state {state!r}):\n{logs}")
        yield {"SLURM_CONF": str(conf)}
    finally:
        for pid_file in reversed(pid_files):  # only the daemons this fixture started
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass


def _wait_for_job(job_id: str, env: dict, timeout: float) -> str:
    """Poll until the job leaves the queue; its final state (COMPLETED, FAILED, ...)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return fields["JobState"]
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env)
    return "still running after the test's timeout (cancelled)"


def test_sbatch_trains_housing_like_a_plain_two_process_run(slurm_cluster, tmp_path):
    """``sbatch scripts/slurm.sbatch housing ...`` on one node with 2 CPU workers: the job's
    summary.json holds exactly the RMSE of ``torchrun --nproc_per_node=2`` on the same data."""
    from tests.small_data import HOUSING_SMALL, write_housing

    (tmp_path / "data").mkdir()
    write_housing(tmp_path / "data")
    args = ["--data-dir", str(tmp_path / "data"), *HOUSING_SMALL]
    # The job inherits this environment (sbatch --export=ALL): PYTHONPATH, and PYTHON names this
    # interpreter, the one with the project's dependencies.
    env = child_env({**slurm_cluster, "NPROC": "2", "PYTHON": sys.executable, "RDZV_PORT": str(free_port())})
    started = time.time()
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--cpus-per-task=2",
            f"--output={tmp_path}/job-%j.out",
            "scripts/slurm.sbatch",
            "housing",
            *args,
            "--out-dir",
            str(tmp_path / "slurm"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    state = _wait_for_job(job_id, env, timeout=240)
    log = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert state == "COMPLETED", f"job {job_id}: {state}\n{log[-3000:]}"
    print(f"sbatch to COMPLETED: {time.time() - started:.1f}s")
    assert "--nproc_per_node=2" in log  # the printed command: 2 CPU workers, no GPU asked for

    plain = run_program("housing/train.py", [*args, "--out-dir", str(tmp_path / "plain")], nproc=2)
    assert plain.returncode == 0, plain.stderr[-3000:]
    job = json.loads((tmp_path / "slurm" / "summary.json").read_text())
    two = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert job["world_size"] == two["world_size"] == 2
    assert job["test"]["rmse"] == two["test"]["rmse"]  # exactly
    assert job["test"] == two["test"]
