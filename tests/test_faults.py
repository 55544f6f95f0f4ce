"""Fault tolerance on the toy program: a killed worker, a truncated checkpoint."""
from __future__ import annotations

import json

from tests.faults import run_and_kill_one_worker, truncate
from tests.launch import run_program

TOY = ["--epochs", "4", "--epoch-seconds", "0.7"]


def test_killed_worker_restarts_from_checkpoint_and_matches_uninterrupted_run(tmp_path):
    straight = run_program("tests/toy_train.py", [*TOY, "--out-dir", str(tmp_path / "straight")], nproc=2)
    assert straight.returncode == 0, straight.stderr
    expected = json.loads((tmp_path / "straight" / "summary.json").read_text())
    result = run_and_kill_one_worker("tests/toy_train.py", TOY, tmp_path / "killed")
    assert result["killed_after_epoch"] < 3  # killed mid-run, not after the end
    assert result["summary"]["params"] == expected["params"]  # bit-identical on CPU
    assert result["summary"]["test"] == expected["test"]
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]  # no duplicated or lost epoch lines


def test_truncated_newest_checkpoint_resumes_from_the_previous_one(tmp_path):
    out = tmp_path / "run"
    first = run_program("tests/toy_train.py", ["--epochs", "3", "--out-dir", str(out)], nproc=2)
    assert first.returncode == 0, first.stderr
    truncate(out / "checkpoint.pt")  # epoch 2's checkpoint; checkpoint.prev.pt holds epoch 1
    resumed = run_program("tests/toy_train.py", ["--epochs", "4", "--out-dir", str(out), "--resume"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    straight = run_program("tests/toy_train.py", ["--epochs", "4", "--out-dir", str(tmp_path / "s")], nproc=2)
    assert json.loads((out / "summary.json").read_text())["params"] == \
        json.loads((tmp_path / "s" / "summary.json").read_text())["params"]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]
