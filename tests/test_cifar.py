"""cifar/: data sources and cache, exact evaluation, real runs, clear failures (augmentation and
models: tests/test_cifar_model.py).

Real multi-process runs use tiny synthetic class-folder datasets (3 classes of 32x32 PNGs) and a
narrow network, so the whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar import data as cdata
from common.errors import UserError
from common.tensorboard import tensorboard_available
from tests.launch import SHARED_DATA, assert_same_weights, error_messages, resume_copy, run_program
from tests.small_data import CIFAR_SMALL, CLASSES, make_batches_archive, make_folders

# --------------------------------------------------------------------------- data, in process


def test_folders_decode_once_then_cache(cifar_data: Path, monkeypatch) -> None:
    data = cdata.load(cifar_data)
    cache = cdata.cache_path(cifar_data, cdata.find_source(cifar_data))
    assert cache.parent == cifar_data and cache.is_file()
    train, labels = data.train_images, data.train_labels
    assert train.shape == (36, 3, 32, 32) and train.dtype == torch.uint8
    assert data.classes == CLASSES and labels.bincount().tolist() == [12, 12, 12]
    # Red images are class 0: the decoded pixels and labels line up.
    assert train[labels == 0][:, 0].float().mean() > train[labels == 0][:, 1].float().mean() + 50
    # The second load reads the cache: it decodes nothing.
    monkeypatch.setattr("cifar.cache.decode_source", lambda *a, **k: pytest.fail("decoded again"))
    again = cdata.load(cifar_data)
    assert torch.equal(again.train_images, train) and torch.equal(again.test_labels, data.test_labels)
    assert torch.equal(cdata.load_cache(cache).train_images, train)


def test_an_image_replaced_in_place_is_decoded_again(cifar_data: Path) -> None:
    """Overwriting one image (same name, same folder sizes) must not leave the cache stale."""
    first = cdata.load(cifar_data)
    Image.fromarray(np.full((32, 32, 3), 7, dtype=np.uint8)).save(cifar_data / "train" / "cat" / "0000.png")
    again = cdata.load(cifar_data)
    replaced = (again.train_images == 7).flatten(1).all(dim=1)
    assert replaced.sum() == 1  # the new image, and only it, is what the run now reads
    assert torch.equal(again.train_images[~replaced], first.train_images[~replaced])


def test_class_folders_inside_tar_gz_and_subfolder(tmp_path: Path) -> None:
    src = make_folders(tmp_path / "src" / "cifar10-png")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar10-png.tar.gz", "w:gz") as tf:
        tf.add(src, arcname="cifar10-png")
    from_tar = cdata.decode_source(cdata.find_source(data_dir))
    from_dir = cdata.decode_source(cdata.find_source(tmp_path / "src"))  # one sub-folder down
    assert from_tar["classes"] == from_dir["classes"] == CLASSES
    assert torch.equal(from_tar["train"][0], from_dir["train"][0])
    assert torch.equal(from_tar["test"][1], from_dir["test"][1])


def test_truncated_archive_is_a_clear_error(tmp_path: Path) -> None:
    src = make_folders(tmp_path / "src")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = data_dir / "cifar10-png.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src / "train", arcname="x/train")
        tf.add(src / "test", arcname="x/test")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt archive") as info:
        cdata.load(data_dir, download=False)
    assert str(archive) in str(info.value)


def test_torchvision_batches_archive_and_folder(tmp_path: Path) -> None:
    make_batches_archive(tmp_path / cdata.ARCHIVE_NAME)
    decoded = cdata.decode_source(cdata.find_source(tmp_path))
    assert decoded["train"][0].shape == (20, 3, 32, 32) and len(decoded["classes"]) == 10
    (tmp_path / "x").mkdir()
    with tarfile.open(tmp_path / cdata.ARCHIVE_NAME) as tf:
        tf.extractall(tmp_path / "x", filter="data")
    from_dir = cdata.decode_source(cdata.find_source(tmp_path / "x"))
    assert torch.equal(from_dir["test"][0], decoded["test"][0])


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


def test_download_checks_sha256_and_leaves_no_temp_file(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    blob = make_batches_archive(served / cdata.ARCHIVE_NAME)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{cdata.ARCHIVE_NAME}"
    try:
        good = hashlib.sha256(blob).hexdigest()
        bad_dir = tmp_path / "bad"
        with pytest.raises(UserError, match="SHA-256"):
            cdata.download_archive(bad_dir, url=url, sha256="0" * 64)
        assert list(bad_dir.iterdir()) == []
        with pytest.raises(UserError, match="download"):
            cdata.download_archive(bad_dir, url=url + ".missing", sha256=good)
        assert list(bad_dir.iterdir()) == []
        target = cdata.download_archive(tmp_path / "ok", url=url, sha256=good)
        assert target.read_bytes() == blob
        assert cdata.find_source(tmp_path / "ok").kind == "archive"
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("truncate", "corrupt or truncated image"),
        ("stray", "not inside a class folder"),
        ("no_test", "no test/ folder"),
        ("size", "expected 32x32"),
    ],
)
def test_bad_folders_name_file_and_expectation(cifar_data: Path, damage: str, expected: str) -> None:
    victim = cifar_data / "train" / "dog" / "0003.png"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:60])
    elif damage == "stray":
        victim.rename(cifar_data / "train" / "loose.png")
    elif damage == "no_test":
        (cifar_data / "test").rename(cifar_data / "testing")
    else:
        Image.new("RGB", (40, 32)).save(victim)
    with pytest.raises(UserError, match=expected) as info:
        cdata.load(cifar_data, download=False)
    assert "\n" not in str(info.value)
    if damage in ("truncate", "size"):
        assert str(victim) in str(info.value)


# --------------------------------------------------------------------------- real runs


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _check(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def test_eval_identical_at_1_2_3_processes(cifar_data: Path, tmp_path: Path) -> None:
    """The 1-process training run's final evaluation, then its checkpoint re-evaluated at 2, 3.

    At 2 processes the run is evaluated in place (``--out-dir`` = the run): only eval.json is
    added, the run's own metrics.jsonl, summary.json and plots are left as they were.
    """
    train = tmp_path / "train"
    _check(
        run_program(
            "cifar/train.py",
            [
                "--data-dir",
                str(cifar_data),
                "--out-dir",
                str(train),
                "--epochs",
                "1",
                "--batch-size",
                "12",
                *CIFAR_SMALL,
            ],
            nproc=1,
        )
    )
    results = {1: _summary(train)}
    run_files = {p: p.read_bytes() for p in sorted(train.rglob("*")) if p.is_file()}
    for nproc in (2, 3):
        out = train if nproc == 2 else tmp_path / f"eval{nproc}"
        _check(
            run_program(
                "cifar/train.py",
                [
                    "--data-dir",
                    str(cifar_data),
                    "--out-dir",
                    str(out),
                    "--eval-only",
                    "--resume",
                    str(train / "checkpoint.pt"),
                    *CIFAR_SMALL,
                ],
                nproc=nproc,
                timeout=120,
            )
        )
        results[nproc] = json.loads((out / "eval.json").read_text())
    assert {p: p.read_bytes() for p in sorted(train.rglob("*")) if p.is_file() and p.name != "eval.json"} == run_files
    for nproc in (1, 2, 3):
        assert results[nproc]["test_images"] == 21
    for nproc in (2, 3):
        assert results[nproc]["world_size"] == nproc
        assert results[nproc]["test_accuracy"] == results[1]["test_accuracy"]
        assert results[nproc]["confusion_matrix"] == results[1]["confusion_matrix"]
        assert results[nproc]["per_class_accuracy"] == results[1]["per_class_accuracy"]
        assert results[nproc]["test_loss"] == pytest.approx(results[1]["test_loss"], rel=1e-6)


TRAIN = ["--batch-size", "12", "--epochs", "2", *CIFAR_SMALL]  # 3 steps an epoch


def _train(data: Path, out: Path, nproc: int, *extra: str) -> dict:
    _check(run_program("cifar/train.py", ["--data-dir", str(data), "--out-dir", str(out), *TRAIN, *extra], nproc=nproc))
    return _summary(out)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run dir) of one 2-process DDP training, shared by the tests of its xdist group
    (with --tensorboard when the package is installed: it only adds files)."""
    root = tmp_path_factory.mktemp("cifar-ddp")
    data = make_folders(root / "data")
    _train(data, root / "straight", 2, *(["--tensorboard"] if tensorboard_available() else []))
    return data, root / "straight"


@pytest.mark.xdist_group("cifar-two-process-run")
def test_two_processes_train_and_resume_exactly(two_process_run, tmp_path: Path) -> None:
    """A run resumed from its epoch-1 checkpoint ends exactly where the uninterrupted run did."""
    data, straight = two_process_run
    resumed = resume_copy(straight, tmp_path / "resumed")
    _train(data, resumed, 2, "--resume")
    a, b = _summary(straight), _summary(resumed)
    assert a["test_loss"] == b["test_loss"] and a["confusion_matrix"] == b["confusion_matrix"]
    assert b["epochs_run"] == 1
    for name in ("curves.png", "confusion_matrix.png"):
        assert (straight / "plots" / name).stat().st_size > 1000
    assert set(a["per_class_accuracy"]) == set(CLASSES) and a["images_per_s"] > 0
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all("test_accuracy" in r for r in rows)


@pytest.mark.xdist_group("cifar-two-process-run")
def test_tensorboard_event_file_matches_metrics_jsonl(two_process_run) -> None:
    """--tensorboard on 2 processes: one event file (rank 0's) holding every number of
    metrics.jsonl, learning rate and samples/s included, at step = epoch."""
    pytest.importorskip("tensorboard")
    from tests.launch import event_scalars

    _, run = two_process_run
    files = list(run.rglob("events.out.tfevents.*"))
    assert [f.parent for f in files] == [run / "tensorboard"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                expected.setdefault(key, []).append((row["epoch"], value))
    assert {"train_loss", "test_accuracy", "lr", "samples_per_s"} <= expected.keys()
    got = event_scalars(run / "tensorboard")
    assert got.keys() == expected.keys()
    for tag, points in expected.items():
        assert [step for step, _ in got[tag]] == [0, 1]
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


@pytest.mark.xdist_group("cifar-two-process-run")
def test_fsdp_trains_like_ddp_and_checkpoints_cross_strategies(two_process_run, tmp_path: Path) -> None:
    """--strategy fsdp: DDP's weights (and Lookahead average) at half the memory.

    Checkpoints move between strategies at world size 2: cifar's trajectory depends on the
    world size whatever the strategy (BatchNorm statistics and augmentation draws are per rank).
    """
    data, ddp_run = two_process_run
    fsdp = _train(data, tmp_path / "fsdp", 2, "--strategy", "fsdp")
    ddp = _summary(ddp_run)
    for key in ("model", "lookahead"):
        assert_same_weights(tmp_path / "fsdp", ddp_run, key)
    assert fsdp["test_loss"] == pytest.approx(ddp["test_loss"], rel=1e-4)
    ratio = fsdp["memory_per_rank"]["total_bytes"] / ddp["memory_per_rank"]["total_bytes"]
    assert 0.45 < ratio < 0.55, ratio
    for start, strategy in ((tmp_path / "fsdp", "ddp"), (ddp_run, "fsdp")):
        resumed = resume_copy(start, tmp_path / f"to-{strategy}")
        assert _train(data, resumed, 2, "--resume", "--strategy", strategy)["epochs_run"] == 1
        for key in ("model", "lookahead"):
            assert_same_weights(resumed, ddp_run, key)


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("missing", "no CIFAR-10 found; expected cifar-10-batches-py/"),
        ("truncate", "corrupt or truncated image"),
    ],
)
def test_bad_data_fails_on_every_rank_without_hang(
    cifar_data: Path, tmp_path: Path, damage: str, expected: str
) -> None:
    data_dir = cifar_data
    if damage == "missing":
        data_dir = tmp_path / "empty"
        data_dir.mkdir()
    else:
        victim = cifar_data / "test" / "ship" / "0001.png"
        victim.write_bytes(victim.read_bytes()[:50])
    out = tmp_path / "run"
    result = run_program(
        "cifar/train.py", ["--data-dir", str(data_dir), "--out-dir", str(out), *CIFAR_SMALL], nproc=2, timeout=60
    )
    assert result.returncode != 0
    # The ranks print at the same moment, so their lines may interleave on the shared pipe.
    errors = error_messages(result.stderr)
    assert {rank for rank, text in errors if expected in text} == {"0", "1"}, result.stderr[:2000]
    # torchrun prints its own report of the failed children; our code prints no traceback.
    assert not [name for name in ("train", "data", "sources", "cache") if f'cifar/{name}.py", line' in result.stderr], (
        result.stderr[:2000]
    )
    assert not out.exists()  # bad input leaves no partial run directory


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_real_data_subset_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "real"
    _check(
        run_program(
            "cifar/train.py",
            [
                "--data-dir",
                str(SHARED_DATA),
                "--out-dir",
                str(out),
                "--train-per-class",
                "100",
                "--test-limit",
                "500",
                "--epochs",
                "3",
                "--batch-size",
                "100",
                "--lr",
                "0.15",
                "--widths",
                "16",
                "32",
                "32",
            ],
            nproc=2,
            timeout=180,
        )
    )
    summary = _summary(out)
    assert summary["test_images"] == 500 and summary["world_size"] == 2
    assert list(summary["per_class_accuracy"]) == summary["classes"] and len(summary["classes"]) == 10
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train_loss"] > rows[1]["train_loss"] > rows[2]["train_loss"]
    assert summary["test_accuracy"] > 0.12  # 30 steps on 1,000 images; chance is 0.1


def test_augment_study_runs_each_variant_and_tabulates(tmp_path: Path, monkeypatch) -> None:
    """The study's plumbing, with train.py replaced by a fake that reports per-variant numbers."""
    import subprocess
    import sys

    from cifar import augment_study

    accuracy = {"base": 0.80, "--translate 0": 0.78, "--no-flip": 0.75, "--cutout 0": 0.81, "--no-tta": 0.79}
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        args = " ".join(cmd)
        out = Path(cmd[cmd.index("--out-dir") + 1])
        out.mkdir(parents=True)
        key = next((k for k in accuracy if k != "base" and k in args), "base")
        (out / ("eval.json" if "--eval-only" in cmd else "summary.json")).write_text(
            json.dumps({"test_accuracy": accuracy[key]})
        )
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(augment_study.subprocess, "run", fake_run)
    monkeypatch.setattr(
        sys, "argv", ["augment_study.py", "--out-dir", str(tmp_path), "--nproc", "2", "--", "--epochs", "1"]
    )
    augment_study.main()
    table = (tmp_path / "augment_study.md").read_text()
    assert len(calls) == 5 and all("--epochs" in c and "torch.distributed.run" in " ".join(c) for c in calls)
    assert "| no horizontal flip | 0.7500 | -5.00 |" in table
    assert "| no test-time flip | 0.7900 | -1.00 |" in table
    assert "| no cutout | 0.8100 | +1.00 |" in table


def test_world_size_invariant_training_is_the_same_at_1_2_and_4_processes(tmp_path, cifar_data):
    """--world-size-invariant: BatchNorm statistics and augmentation draws over the global batch,
    so 2 epochs (6 steps) at 1, 2 and 4 processes end with the same weights (the float
    tolerance of the other programs' world-size tests); without it 1 and 2 already differ."""
    args = [
        "--data-dir",
        str(cifar_data),
        "--batch-size",
        "12",
        "--epochs",
        "2",
        "--amp",
        "off",
        "--cutout",
        "4",
        *CIFAR_SMALL,
    ]
    runs = {}
    for flags, sizes in ((["--world-size-invariant"], (1, 2, 4)), ([], (1, 2))):
        for nproc in sizes:
            out = tmp_path / f"{'inv' if flags else 'per-rank'}-{nproc}"
            result = run_program("cifar/train.py", [*args, *flags, "--out-dir", str(out)], nproc=nproc, timeout=120)
            assert result.returncode == 0, result.stderr[-2000:]
            runs[bool(flags), nproc] = out
    assert_same_weights(runs[True, 2], runs[True, 1])
    assert_same_weights(runs[True, 4], runs[True, 1])
    with pytest.raises(AssertionError, match="not close"):
        assert_same_weights(runs[False, 2], runs[False, 1])


def test_alternating_flip_trains_alike_at_1_and_2_processes(tmp_path, cifar_data):
    """--alternating-flip: each image's flip comes with it in the batch (a tensor sharded like
    the images), so with --world-size-invariant 1 and 2 processes still end with the same
    weights; and the flag changes the training (it is not ignored)."""
    args = [
        "--data-dir",
        str(cifar_data),
        "--batch-size",
        "12",
        "--epochs",
        "2",
        "--amp",
        "off",
        "--world-size-invariant",
        *CIFAR_SMALL,
    ]
    runs = {}
    for flags, nproc in ((["--alternating-flip"], 1), (["--alternating-flip"], 2), ([], 1)):
        out = tmp_path / f"{'alt' if flags else 'coin'}-{nproc}"
        result = run_program("cifar/train.py", [*args, *flags, "--out-dir", str(out)], nproc=nproc, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[bool(flags), nproc] = out
    assert_same_weights(runs[True, 2], runs[True, 1])
    with pytest.raises(AssertionError, match="not close"):
        assert_same_weights(runs[False, 1], runs[True, 1])


def test_muon_trains_alike_at_1_and_2_processes_and_resumes_exactly(tmp_path, cifar_data):
    """--optimizer muon: every rank orthogonalises the same averaged gradients, so with
    --world-size-invariant 1 and 2 processes end with the same weights; a 2-process run resumed
    from its epoch-1 checkpoint ends bit-identical to the uninterrupted one (the optimizer's
    momentum is in the checkpoint); and Muon changes the training (it is not ignored)."""
    args = ["--data-dir", str(cifar_data), *TRAIN, "--amp", "off", "--world-size-invariant"]
    runs = {}
    for optimizer, nproc in (("muon", 1), ("muon", 2), ("sgd", 1)):
        runs[optimizer, nproc] = tmp_path / f"{optimizer}-{nproc}"
        _check(
            run_program(
                "cifar/train.py",
                [*args, "--optimizer", optimizer, "--out-dir", str(runs[optimizer, nproc])],
                nproc=nproc,
                timeout=120,
            )
        )
    assert_same_weights(runs["muon", 2], runs["muon", 1])
    with pytest.raises(AssertionError, match="not close"):
        assert_same_weights(runs["sgd", 1], runs["muon", 1])
    resumed = resume_copy(runs["muon", 2], tmp_path / "resumed")
    _check(
        run_program(
            "cifar/train.py",
            [*args, "--optimizer", "muon", "--out-dir", str(resumed), "--resume"],
            nproc=2,
            timeout=120,
        )
    )
    a, b = _summary(runs["muon", 2]), _summary(resumed)
    assert a["test_loss"] == b["test_loss"] and a["confusion_matrix"] == b["confusion_matrix"]
    assert_same_weights(resumed, runs["muon", 2])


def test_muon_under_fsdp_steps_like_ddp_and_resumes_exactly(tmp_path, cifar_data):
    """--optimizer muon --strategy fsdp: each rank gathers a filter bank's momentum, orthogonalises
    the whole and keeps its rows, so 2 FSDP processes end with DDP's weights; the momentum
    buffers are sharded like the weights and a resumed FSDP run ends bit-identical."""
    args = ["--data-dir", str(cifar_data), *TRAIN, "--amp", "off", "--optimizer", "muon"]
    runs = {}
    for strategy in ("ddp", "fsdp"):
        runs[strategy] = tmp_path / strategy
        _check(
            run_program(
                "cifar/train.py",
                [*args, "--strategy", strategy, "--out-dir", str(runs[strategy])],
                nproc=2,
                timeout=120,
            )
        )
    assert_same_weights(runs["fsdp"], runs["ddp"])
    resumed = resume_copy(runs["fsdp"], tmp_path / "resumed")
    _check(
        run_program(
            "cifar/train.py", [*args, "--strategy", "fsdp", "--out-dir", str(resumed), "--resume"], nproc=2, timeout=120
        )
    )
    assert _summary(resumed)["test_loss"] == _summary(runs["fsdp"])["test_loss"]
    assert_same_weights(resumed, runs["fsdp"])
