"""Pre-emption: SIGTERM to torchrun's agent mid-epoch; the job checkpoints the step and leaves
within 30 s, and ``--resume`` ends exactly where an uninterrupted run ends."""
from __future__ import annotations

import json

import pytest
import torch

from common.preempt import PREEMPTED_EXIT
from tests.faults import run_and_terminate
from tests.launch import run_program


def _case(program: str, data_root):
    from tests.test_cifar import SMALL as CIFAR_SMALL
    from tests.test_cifar import make_folders
    from tests.test_housing import TRAIN_ARGS as HOUSING_SMALL
    from tests.test_housing import synthetic_frame

    data = data_root / "data"
    if program == "anomaly":
        from anomaly.data import TRAIN_FILE
        from anomaly.synthetic import make_partition, write_partition
        from tests.test_anomaly_train import FAST as ANOMALY_SMALL

        data.mkdir()
        write_partition(make_partition(3000, seed=3), data / TRAIN_FILE)
        args = [*ANOMALY_SMALL, "--epochs", "4"]
    elif program == "housing":
        data.mkdir()
        synthetic_frame().to_csv(data / "housing.csv", index=False)
        # Batches of 16: 27 steps an epoch, so the signal lands inside one.
        args = [*HOUSING_SMALL, "--epochs", "5", "--patience", "100", "--batch-size", "16",
                "--no-baselines"]
    else:
        make_folders(data)
        args = [*CIFAR_SMALL, "--batch-size", "12", "--epochs", "4"]  # 10 steps an epoch
    return ["--data-dir", str(data), *args]


def _metric(program: str, out) -> float:
    summary = json.loads((out / "summary.json").read_text())
    return {"housing": lambda: summary["test"]["rmse"], "cifar": lambda: summary["test_accuracy"],
            "anomaly": lambda: summary["test"]["f1"]}[program]()


@pytest.mark.parametrize("program", ["housing", "cifar", "anomaly"])
def test_sigterm_mid_epoch_checkpoints_the_step_and_resume_ends_identically(tmp_path, program):
    args = _case(program, tmp_path)
    out = tmp_path / "preempted"
    stopped = run_and_terminate(f"{program}/train.py", args, out)
    assert stopped["exit_s"] < 30, stopped["stderr"][-3000:]
    # The workers exit PREEMPTED_EXIT; torchrun itself, having been signalled, ends with its own
    # SignalException (status 1) once they are gone.
    assert stopped["returncode"] != 0
    assert f"(exit status {PREEMPTED_EXIT})" in stopped["stdout"], stopped["stderr"][-3000:]
    assert "pre-empted by SIGTERM: stopped after step" in stopped["stdout"]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step_in_epoch"] > 0 and len(state["epoch_sums"]) == 2
    assert not (out / "summary.json").exists()

    resumed = run_program(f"{program}/train.py", [*args, "--out-dir", str(out), "--resume"], nproc=2,
                          timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_program(f"{program}/train.py", [*args, "--out-dir", str(tmp_path / "straight")],
                           nproc=2, timeout=180)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert _metric(program, out) == _metric(program, tmp_path / "straight")  # exactly, on CPU
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    loss = "train_loss"
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in straight_rows]
    assert [r[loss] for r in rows] == [r[loss] for r in straight_rows]  # the split epoch's too
