"""Multi-process gloo tests of common/: each would fail if the distributed behaviour broke."""

from __future__ import annotations

import json
import time

import pytest
import torch

from common.dist import DistInfo
from tests import dist_workers as w
from tests.launch import run_program, run_torchrun

# The single-process reference runs in the test process itself: no process group needed.
SINGLE = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_steps_equal_single_process_steps(tmp_path, world_size):
    """k SGD steps with global batch B on N processes == k steps with batch B on one."""
    single = w.ddp_sgd_steps(SINGLE, 12, 5)
    multi = w.spawn(w.ddp_sgd_steps, world_size, tmp_path, 12, 5)
    initial = [p.detach() for p in (torch.manual_seed(0), w.mlp())[1].parameters()]
    assert any(not torch.allclose(p, q) for p, q in zip(single["params"], initial))  # it trained
    for rank_result in multi:  # every rank holds the same weights, equal to one process's
        for p_multi, p_single in zip(rank_result["params"], single["params"]):
            torch.testing.assert_close(p_multi, p_single, rtol=1e-5, atol=1e-6)


def test_ranks_starting_from_different_states_all_stop(tmp_path, capfd):
    results = w.spawn(w.disagreeing_start, 2, tmp_path)
    assert [r["exit"] for r in results] == [2, 2]
    err = capfd.readouterr().err
    assert "error: the state training starts from" in err and "[rank 1] error: " in err
    assert "rank 0: epoch 3" in err and "rank 1: epoch None" in err


def test_local_rank_zero_first_waits_and_agrees_on_errors(tmp_path, capfd):
    """on_local_rank_zero_first on 3 ranks as 2 nodes (local ranks 0, 1 | 0)."""
    results = w.spawn(w.local_rank_zero_first, 3, tmp_path, str(tmp_path))
    ok = [r["ok"] for r in results]
    assert [r["result"] for r in ok] == [f"ok from rank {i}" for i in range(3)]
    assert [len(r["calls"]) for r in ok] == [1, 1, 1]
    # Rank 1 (local rank 1) started only after its node's local rank 0 had finished; rank 2,
    # local rank 0 of the other node, did not wait for rank 0.
    assert ok[1]["calls"][0][0] >= ok[0]["calls"][0][1]
    assert ok[2]["calls"][0][0] < ok[0]["calls"][0][1]
    # A failing first call: every rank stops with status 2, the waiting rank never calls fn.
    first = [r["first_fails"] for r in results]
    assert [r["exit"] for r in first] == [2, 2, 2]
    assert [len(r["calls"]) for r in first] == [1, 0, 1]
    # A failing later call (rank 1's own): every rank stops too.
    later = [r["later_fails"] for r in results]
    assert [r["exit"] for r in later] == [2, 2, 2]
    err = capfd.readouterr().err
    for scenario, rank in (("first_fails", 0), ("later_fails", 1)):
        message = f"error: {scenario}: bad data seen by rank {rank}"
        assert sorted(line for line in err.splitlines() if line.endswith(message)) == [
            f"[rank 1] {message}",
            f"[rank 2] {message}",
            message,
        ], err


def test_agreed_stops_every_rank_when_one_rank_fails(tmp_path, capfd):
    """A data problem seen by one rank only (say its node's copy differs) stops all three."""
    results = w.spawn(w.agreed_data, 3, tmp_path)
    assert [r["good"] for r in results] == [f"fine on rank {i}" for i in range(3)]
    assert [r["exit"] for r in results] == [2, 2, 2]
    message = "error: rank 1's copy of the data is bad"
    lines = [line for line in capfd.readouterr().err.splitlines() if line.endswith(message)]
    assert sorted(lines) == [f"[rank 1] {message}", f"[rank 2] {message}", message]


def test_uneven_last_batch_steps_equal_single_process_steps(tmp_path):
    """100 samples, global batch 12, 3 ranks: the last batch (16 rows) splits 6/5/5. Each rank's
    mean loss is weighted by its share, so the 8th step is one process's step too."""
    single = w.ddp_sgd_steps(SINGLE, 12, 8, 100)
    multi = w.spawn(w.ddp_sgd_steps, 3, tmp_path, 12, 8, 100)
    seven = w.ddp_sgd_steps(SINGLE, 12, 7, 100)
    assert any(not torch.allclose(p, q) for p, q in zip(single["params"], seven["params"]))  # it stepped
    for rank_result in multi:
        for p_multi, p_single in zip(rank_result["params"], single["params"]):
            torch.testing.assert_close(p_multi, p_single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world_size", [2, 3])
def test_evaluation_is_exact_on_uneven_shards(tmp_path, world_size):
    """101 samples on 2 and 3 ranks: loss, RMSE, accuracy, confusion matrix equal one process."""
    single = w.exact_metrics(SINGLE, 4)
    multi = w.spawn(w.exact_metrics, world_size, tmp_path, 4)
    logits, targets = w.classification_data()
    assert single["n"] == 101
    assert single["accuracy"] == (logits.argmax(1) == targets).double().mean().item()
    for result in multi:
        assert result["n"] == 101  # no padded duplicates counted
        assert result["accuracy"] == single["accuracy"]
        assert torch.equal(result["confusion"], single["confusion"])
        assert result["confusion"].sum() == 101
        assert result["loss"] == pytest.approx(single["loss"], rel=1e-12)
        assert result["rmse"] == pytest.approx(single["rmse"], rel=1e-12)
        assert torch.equal(result["scores"], logits[:, 1])  # gathered in original order


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_sample_drawn_once_per_epoch_and_order_changes(tmp_path, world_size):
    results = w.spawn(w.sampled_indices, world_size, tmp_path, 103, 12, 3)
    for result in results:
        assert result["steps"] == 103 // 12
        epochs = result["per_epoch"]
        for drawn in epochs:
            assert sorted(drawn.tolist()) == list(range(103))  # every sample exactly once
        assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
        assert torch.equal(epochs[0], results[0]["per_epoch"][0])  # ranks agree on the gather


def test_collective_times_out_instead_of_hanging_when_a_peer_is_gone(tmp_path):
    start = time.time()
    results = w.spawn(w.collective_after_peer_exit, 2, tmp_path)
    assert results[0]["outcome"] != "completed"
    assert time.time() - start < 60


def _params(run_dir):
    return json.loads((run_dir / "summary.json").read_text())["params"]


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for args in (
        ["--out-dir", str(straight), "--epochs", "4"],
        ["--out-dir", str(resumed), "--epochs", "2"],
        ["--out-dir", str(resumed), "--epochs", "4", "--resume"],
    ):
        result = run_program("tests/toy_train.py", args, nproc=2)
        assert result.returncode == 0, result.stderr
    assert _params(resumed) == _params(straight)  # bit-identical on CPU
    epochs = [json.loads(line)["epoch"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]


def test_forked_ranks_train_exactly_like_torchruns_workers(tmp_path):
    """The suite's launcher (tests/forkrun.py) stands in for torchrun: the same run through both
    ends with the same weights, bit for bit, and the same records."""
    args = ["--epochs", "2", "--batch-size", "12"]
    for launch, out in ((run_program, tmp_path / "forked"), (run_torchrun, tmp_path / "torchrun")):
        result = launch("tests/toy_train.py", [*args, "--out-dir", str(out)], nproc=2)
        assert result.returncode == 0, result.stderr
    assert _params(tmp_path / "forked") == _params(tmp_path / "torchrun")
    forked, real = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("forked", "torchrun"))
    assert forked["world_size"] == real["world_size"] == 2 and forked["test"] == real["test"]


def test_single_process_path_without_torchrun(tmp_path):
    result = run_program("tests/toy_train.py", ["--out-dir", str(tmp_path), "--epochs", "1"], nproc=1)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["device"] == "cpu"
    assert summary["test"]["n"] == 101


def test_error_on_one_rank_stops_every_rank_quickly(tmp_path):
    start = time.time()
    result = run_program(
        "tests/toy_train.py", ["--out-dir", str(tmp_path / "run"), "--fail-on-rank", "1"], nproc=2, timeout=60
    )
    elapsed = time.time() - start
    assert result.returncode != 0
    assert "error: missing data file" in result.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s to stop"
    assert not (tmp_path / "run" / "summary.json").exists()
