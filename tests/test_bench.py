"""bench/bench.py: the tables' fields are there and sane, on a tiny synthetic workload."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.bench import render, summarize
from tests.launch import REPO, child_env


def test_summarize_splits_the_step_and_clamps_noise():
    # per rank: data, fwd_bwd, optimizer (normal), the same (no_sync), peak bytes, CPU share
    ranks = [
        [0.001, 0.010, 0.002, 0.001, 0.007, 0.002, 100.0, 0.9],
        [0.001, 0.012, 0.002, 0.001, 0.007, 0.002, 300.0, 0.8],
    ]
    s = summarize(ranks, global_batch=64, world_size=2)
    assert s["comm_s"] == pytest.approx(0.004)
    assert s["fwd_bwd_s"] == pytest.approx(0.007)
    assert s["step_s"] == pytest.approx(0.014)
    assert sum(s["shares"].values()) == pytest.approx(1.0)
    assert s["samples_per_s_per_process"] == pytest.approx(32 / 0.014)
    assert s["peak_memory_bytes"] == 300 and s["cpu_share"] == 0.8
    # no_sync slower than normal (noise): comm is 0, not negative, and the parts still add up
    noisy = summarize([[0.001, 0.010, 0.002, 0.001, 0.011, 0.002, 1.0, 1.0]], 64, 1)
    assert noisy["comm_s"] == 0.0 and noisy["comm_raw_s"] < 0
    assert noisy["step_s"] == pytest.approx(0.013)


def test_bench_runs_at_world_size_1_and_2(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "bench" / "bench.py"),
        "--programs",
        "synthetic",
        "--world-sizes",
        "1,2",
        "--tables",
        "throughput,memory",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "benchmarks.json").read_text())
    runs = report["results"]["programs"]["synthetic"]
    assert set(runs) == {"1", "2"}
    for ws, run in runs.items():
        assert run["world_size"] == int(ws)
        assert run["per_rank_batch"] * int(ws) == run["global_batch"]
        assert len(run["per_rank"]) == int(ws)
        assert run["samples_per_s_per_process"] > 0
        assert run["samples_per_s_total"] == pytest.approx(run["samples_per_s_per_process"] * int(ws))
        assert sum(run["shares"].values()) == pytest.approx(1.0, abs=0.01)
        assert all(0 <= v <= 1 for v in run["shares"].values())
        assert run["comm_s"] >= 0 and run["data_s"] > 0 and run["fwd_bwd_s"] > 0
        assert run["peak_memory_bytes"] > 10 * 2**20  # a Python process with torch loaded
        assert 0 < run["cpu_share"] < 3
    assert runs["1"]["scaling_efficiency"] == pytest.approx(1.0)
    assert runs["2"]["scaling_efficiency"] > 0
    memory = report["results"]["memory"]["synthetic"]
    assert memory["world_size"] == 2
    assert memory["ddp"]["param_bytes"] == memory["ddp"]["grad_bytes"] > 0
    assert 0.45 < memory["fsdp_over_ddp"] < 0.6  # sharded over 2 ranks: about half
    text = (tmp_path / "benchmarks.md").read_text()
    for needed in (
        "### synthetic",
        "scaling efficiency",
        "comm ms",
        "fsdp / ddp",
        "Reproduce: `python bench/bench.py",
        "This report has no GPU figures",
    ):
        assert needed in text
    assert text == render(report)


def test_bad_arguments_give_one_line_errors():
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench.py"), "--programs", "nope"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: --programs") and "\n" not in done.stderr.strip()


def test_peer_race_runs_both_systems_on_the_same_images_side_by_side(tmp_path):
    """--tables peer: bench/airbench94.py and cifar/train.py --preset airbench94 at 1 and 2
    processes on the same (synthetic, easy) images; the ratio is the project's time to the
    target over the peer's of the same seed; benchmarks.md is not touched."""
    from bench.peer import render_race
    from tests.small_data import make_folders

    data = make_folders(tmp_path / "data", n_train=345, n_test=20)  # 1,035 images: one batch
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "bench.py"),
        "--tables",
        "peer",
        "--data-dir",
        str(data),
        "--seeds",
        "0",
        "--world-sizes",
        "1,2",
        "--target-accuracy",
        "0.25",
        "--peer-epochs",
        "2",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "cifar-vs-airbench94.json").read_text())
    rows = report["rows"]
    assert [(r["system"], r["processes"]) for r in rows] == [
        ("airbench94 peer", 1),
        ("cifar/train.py --preset airbench94", 1),
        ("cifar/train.py --preset airbench94", 2),
    ]
    peer = rows[0]
    assert peer["epochs"] == 2 and rows[1]["epochs"] == rows[2]["epochs"] == 2
    for row in rows:
        # Two steps of airbench's learning rate on 3 classes: the machinery is under test here,
        # not the accuracy (the target is below chance, so every run reaches it).
        assert row["test_accuracy_flip_tta"] >= 0.25 and row["time_to_target_s"] > 0, row
        assert row["time_to_target_s"] < row["wall_time_s"] and row["timed_s"] < row["wall_time_s"]
        assert row["ratio_to_peer"] == pytest.approx(row["time_to_target_s"] / peer["time_to_target_s"])
    assert peer["ratio_to_peer"] == 1.0 and 0 < peer["test_accuracy_flip_translate_tta"] <= 1
    text = (out / "cifar-vs-airbench94.md").read_text()
    assert "\n".join(render_race(report)) in text and text.strip() in done.stdout
    assert not (out / "benchmarks.md").exists()


def test_peer_on_too_few_images_stops_with_one_line(tmp_path):
    """The peer's batches are 1,024 images: fewer training images is a one-line error, and the
    race reports it as the peer's failure, with nothing written to --out."""
    from tests.small_data import make_folders

    data = make_folders(tmp_path / "data")  # 36 training images
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "airbench94.py"), "--data-dir", str(data), "--device", "cpu"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == (
        "error: the recipe needs at least 1024 training images and --epochs above 0 (got 36 images, --epochs 9.9)"
    )
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "bench.py"),
            "--tables",
            "peer",
            "--data-dir",
            str(data),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "bench/airbench94.py (seed 0) failed" in done.stderr
    assert "the recipe needs at least 1024 training images" in done.stderr
    assert not (tmp_path / "out").exists()
