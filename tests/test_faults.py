"""Fault tolerance for real: a truncated checkpoint; a SIGKILLed worker in each program."""
from __future__ import annotations

import json

import pytest

from tests.faults import run_and_kill_one_worker, truncate
from tests.launch import run_program

def test_truncated_newest_checkpoint_resumes_from_the_previous_one(tmp_path):
    out = tmp_path / "run"
    first = run_program("tests/toy_train.py", ["--epochs", "3", "--out-dir", str(out)], nproc=2)
    assert first.returncode == 0, first.stderr
    truncate(out / "checkpoint.pt")  # epoch 2's checkpoint; checkpoint.prev.pt holds epoch 1
    resumed = run_program("tests/toy_train.py", ["--epochs", "4", "--out-dir", str(out), "--resume"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    straight = run_program("tests/toy_train.py", ["--epochs", "4", "--out-dir", str(tmp_path / "s")], nproc=2)
    assert straight.returncode == 0, straight.stderr
    assert json.loads((out / "summary.json").read_text())["params"] == \
        json.loads((tmp_path / "s" / "summary.json").read_text())["params"]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]


# --- the three programs: SIGKILL one worker mid-training under torchrun --max-restarts=1 ------

def _program_case(program: str, data_root):
    from anomaly.data import TRAIN_FILE
    from anomaly.synthetic import make_partition, write_partition
    from tests.test_anomaly_train import FAST as ANOMALY_SMALL
    from tests.test_cifar import SMALL as CIFAR_SMALL
    from tests.test_cifar import make_folders
    from tests.test_housing import TRAIN_ARGS as HOUSING_SMALL
    from tests.test_housing import synthetic_frame

    data = data_root / program
    if program == "housing":
        data.mkdir()
        synthetic_frame().to_csv(data / "housing.csv", index=False)
        args = [*HOUSING_SMALL, "--epochs", "12", "--patience", "100"]
    elif program == "cifar":
        make_folders(data)
        args = [*CIFAR_SMALL, "--batch-size", "12", "--epochs", "4"]
    else:
        data.mkdir()
        write_partition(make_partition(3000, seed=3), data / TRAIN_FILE)
        args = [*ANOMALY_SMALL, "--epochs", "10"]
    return ["--data-dir", str(data), *args]


@pytest.mark.parametrize("program,metric", [("housing", "test_rmse"), ("cifar", "test_accuracy"),
                                            ("anomaly", "test_f1")])
def test_program_survives_a_killed_worker(tmp_path, program, metric):
    args = _program_case(program, tmp_path)
    straight = run_program(f"{program}/train.py", [*args, "--out-dir", str(tmp_path / "straight")],
                           nproc=2, timeout=180)
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = json.loads((tmp_path / "straight" / "summary.json").read_text())
    result = run_and_kill_one_worker(f"{program}/train.py", args, tmp_path / "killed")
    # A worker failed (the survivor's collective broke when its peer died), yet the job exited 0.
    assert "failed (exitcode" in result["stderr"]
    got = result["summary"]
    assert _metric(got, metric) == _metric(expected, metric)  # exactly, on CPU
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs))  # no epoch logged twice after the restart


def _metric(summary: dict, name: str):
    """Read a test metric from a summary, whichever nesting the program uses."""
    split, _, key = name.partition("_")
    if isinstance(summary.get(split), dict) and key in summary[split]:
        return summary[split][key]
    return summary[name] if name in summary else summary["test"][key]
