"""Pre-emption: SIGTERM to torchrun's agent mid-epoch; the job checkpoints the step and leaves
within 30 s, and ``--resume`` ends exactly where an uninterrupted run ends.

Each program's job is first hit by a SIGKILLed worker that torchrun restarts (--max-restarts=1),
then pre-empted: one launch checks both recoveries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from common.preempt import PREEMPTED_EXIT
from tests.faults import kill_then_preempt
from tests.launch import REPO, child_env, free_port, run_program


def _case(program: str, data_root):
    from tests.small_data import CIFAR_SMALL, HOUSING_SMALL, make_folders, write_housing

    data = data_root / "data"
    if program == "anomaly":
        from tests.small_data import ANOMALY_SMALL, write_anomaly

        data.mkdir()
        write_anomaly(data)
        args = [*ANOMALY_SMALL, "--epochs", "5"]
    elif program == "housing":
        data.mkdir()
        write_housing(data)
        # Batches of 16: 27 steps an epoch, so the signal lands inside one.
        args = [*HOUSING_SMALL, "--epochs", "5", "--patience", "100", "--batch-size", "16", "--no-baselines"]
    else:
        make_folders(data)
        args = [*CIFAR_SMALL, "--batch-size", "12", "--epochs", "5"]  # 10 steps an epoch
    return ["--data-dir", str(data), *args]


def _metric(program: str, out) -> float:
    summary = json.loads((out / "summary.json").read_text())
    return {
        "housing": lambda: summary["test"]["rmse"],
        "cifar": lambda: summary["test_accuracy"],
        "anomaly": lambda: summary["test"]["f1"],
    }[program]()


@pytest.mark.parametrize("program", ["housing", "cifar", "anomaly"])
def test_killed_worker_then_sigterm_mid_epoch_and_resume_ends_identically(tmp_path, program):
    args = _case(program, tmp_path)
    out = tmp_path / "preempted"
    # SIGKILL rank 1 after the first checkpoint; once the restarted job has saved, SIGTERM into
    # housing's next epoch (27 steps); the others' epochs are shorter than a delay.
    stopped = kill_then_preempt(f"{program}/train.py", args, out, delay_s=0.2 if program == "housing" else 0)
    # A worker failed (the survivor's collective broke when its peer died) and was restarted.
    assert "failed (exitcode" in stopped["stderr"], stopped["stderr"][-3000:]
    assert stopped["exit_s"] < 30, stopped["stderr"][-3000:]
    # The workers exit PREEMPTED_EXIT; torchrun itself, having been signalled, ends with its own
    # SignalException (status 1) once they are gone.
    assert stopped["returncode"] != 0
    assert f"(exit status {PREEMPTED_EXIT})" in stopped["stdout"], stopped["stderr"][-3000:]
    assert "pre-empted by SIGTERM: stopped after step" in stopped["stdout"]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step_in_epoch"] > 0 and len(state["epoch_sums"]) == 2
    assert not (out / "summary.json").exists()

    resumed = run_program(f"{program}/train.py", [*args, "--out-dir", str(out), "--resume"], nproc=2, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_program(
        f"{program}/train.py", [*args, "--out-dir", str(tmp_path / "straight")], nproc=2, timeout=180
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert _metric(program, out) == _metric(program, tmp_path / "straight")  # exactly, on CPU
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    loss = "train_loss"
    # No epoch logged twice after the restart or the resume, and every epoch's loss (the split
    # epoch's too) is the uninterrupted run's.
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in straight_rows] == list(range(len(rows)))
    assert [r[loss] for r in rows] == [r[loss] for r in straight_rows]


def test_slurm_script_passes_the_warning_on_and_requeues(tmp_path):
    """scripts/slurm.sbatch under stand-ins for srun and scontrol: SIGUSR1 to the batch script
    (what ``--signal=B:USR1@120`` does) reaches the workers through torchrun, the job stops after
    a step with a checkpoint, and the script asks SLURM to requeue it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nshift  # --kill-on-bad-exit=1\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\n[[ $1 == show ]] && echo localhost && exit 0\necho "$@" >> {tmp_path / "scontrol.log"}\n'
    )
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    args = _case("housing", tmp_path)
    out = tmp_path / "run"
    env = child_env(
        {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "SLURM_NNODES": "1",
            "SLURM_GPUS_ON_NODE": "2",
            "SLURM_JOB_ID": "7",
            "RDZV_PORT": str(free_port()),
        }
    )
    job = subprocess.Popen(
        ["bash", "scripts/slurm.sbatch", "housing/train.py", *args, "--out-dir", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (out / "checkpoint.pt").exists():
        assert job.poll() is None and time.time() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.02)
    job.send_signal(signal.SIGUSR1)
    sent = time.time()
    stdout, stderr = job.communicate(timeout=60)
    assert time.time() - sent < 30
    assert job.returncode != 0
    assert "pre-empted by SIGUSR1: stopped after step" in stdout, stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "7"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step_in_epoch"] > 0


def test_sigterm_once_training_is_over_stops_the_process_at_once(tmp_path):
    """After the last step nothing reads the pre-emption flag, so the signal handler is given
    back: a SIGTERM during the extras (here a baseline fit that sleeps a minute) ends the
    process at once, the results already on disk (before, it was noted and ignored)."""
    import sys

    from tests.small_data import HOUSING_SMALL, write_housing

    write_housing(tmp_path)
    out = tmp_path / "run"
    args = ["--data-dir", str(tmp_path), "--out-dir", str(out), *HOUSING_SMALL[:-1]]
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "slow_extras.py"), *args],
        cwd=REPO,
        env=child_env({"SLOW_BASELINES_S": "120"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 90
    while not (out / "summary.json").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert (out / "summary.json").exists(), process.communicate(timeout=5)
    time.sleep(2)  # into the baseline fit
    process.send_signal(signal.SIGTERM)
    sent = time.time()
    try:
        process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGTERM and time.time() - sent < 10
    assert json.loads((out / "summary.json").read_text())["test"]["rmse"] > 0
