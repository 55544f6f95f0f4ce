"""Bad input on 2 processes: every rank exits non-zero within 30 s with one clear line.

The data-file cases (bad CSVs, truncated images, wrong layouts) live beside each program's own
tests; this file tries the shared arguments and cross-program mistakes on all three programs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from anomaly.data import TRAIN_FILE
from anomaly.synthetic import make_partition, write_partition
from tests.launch import error_messages, run_program
from tests.small_data import ANOMALY_SMALL, CIFAR_SMALL, HOUSING_SMALL, make_folders, synthetic_frame, write_housing

LIMIT_S = 30


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reliability")
    (root / "housing").mkdir()
    write_housing(root / "housing")
    (root / "anomaly").mkdir()
    write_partition(make_partition(600, seed=1), root / "anomaly" / TRAIN_FILE)
    return {"housing": root / "housing", "cifar": make_folders(root / "cifar"), "anomaly": root / "anomaly"}


def program_args(program: str, data: dict[str, Path], out: Path) -> list[str]:
    small = {
        "housing": HOUSING_SMALL,
        "cifar": [*CIFAR_SMALL, "--batch-size", "12", "--epochs", "1"],
        "anomaly": ANOMALY_SMALL,
    }[program]
    return ["--data-dir", str(data[program]), "--out-dir", str(out), *small]


def expect_clean_failure(program: str, args: list[str], message: str, out: Path | None = None) -> float:
    """Run on 2 processes; check the exit, the one-line message, the time, no partial output."""
    start = time.time()
    result = run_program(f"{program}/train.py", args, nproc=2, timeout=LIMIT_S + 30)
    elapsed = time.time() - start
    assert result.returncode != 0, result.stdout[-2000:]
    errors = error_messages(result.stderr)
    # Arguments are checked before the process group forms, so torchrun may stop one rank
    # before it prints; at least one line, and every line printed names the cause.
    assert errors, result.stderr[-3000:]
    assert all(message in text for _, text in errors), result.stderr[-3000:]
    # torchrun prints its own launcher traceback; none may run through this project's code.
    assert f"{program}/" not in result.stderr.replace(f"{program}/train.py FAILED", "")
    assert "common/" not in result.stderr
    assert elapsed < LIMIT_S, f"took {elapsed:.1f}s"
    if out is not None:
        assert not (out / "summary.json").exists() and not (out / "metrics.jsonl").exists()
    return elapsed


@pytest.mark.parametrize(
    "program,flags,message",
    [
        ("housing", ["--epochs", "0"], "--epochs must be a positive integer, got 0"),
        ("cifar", ["--epochs", "-2"], "--epochs must be a positive integer, got -2"),
        ("housing", ["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        ("cifar", ["--batch-size", "1"], "--batch-size 1 is smaller than the world size 2"),
        ("housing", ["--batch-size", "97"], "--batch-size 97 does not divide by the world size 2"),
        ("anomaly", ["--batch-size", "-4"], "--batch-size must be a positive integer, got -4"),
        ("anomaly", ["--lr", "0"], "--lr must be positive, got 0.0"),
    ],
)
def test_bad_shared_arguments(datasets, tmp_path, program, flags, message):
    out = tmp_path / "run"
    expect_clean_failure(program, [*program_args(program, datasets, out), *flags], message, out)


@pytest.mark.parametrize("program", ["housing", "cifar", "anomaly"])
def test_out_dir_that_is_not_writable(datasets, tmp_path, program):
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "run"
    expect_clean_failure(program, program_args(program, datasets, out), "is not writable")


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    expect_clean_failure(
        "cifar",
        ["--data-dir", str(missing), "--out-dir", str(tmp_path / "c"), "--no-download", *CIFAR_SMALL],
        "no CIFAR-10 found",
        tmp_path / "c",
    )
    # No network in tests: point the download at a closed local port so it fails at once.
    expect_clean_failure(
        "housing",
        [
            "--data-dir",
            str(missing),
            "--out-dir",
            str(tmp_path / "h"),
            "--download-url",
            "http://127.0.0.1:9/housing.csv",
            *HOUSING_SMALL,
        ],
        "not found and the download failed",
        tmp_path / "h",
    )
    expect_clean_failure(
        "anomaly",
        ["--data-dir", str(missing), "--out-dir", str(tmp_path / "a"), *ANOMALY_SMALL],
        "UNSW",
        tmp_path / "a",
    )


def foreign_checkpoint(run_dir: Path, meta: dict) -> Path:
    """A real checkpoint file, as ``save_checkpoint`` writes it, with the given ``meta``."""
    import torch

    from common.checkpoint import save_checkpoint, training_state
    from common.dist import DistInfo

    run_dir.mkdir()
    model = torch.nn.Linear(3, 1)
    state = training_state(model, torch.optim.SGD(model.parameters(), lr=0.1), 0, meta)
    save_checkpoint(run_dir, state, DistInfo(0, 0, 1, 1, torch.device("cpu")))
    return run_dir / "checkpoint.pt"


def test_resume_from_another_programs_checkpoint(datasets, tmp_path):
    housing_ckpt = foreign_checkpoint(tmp_path / "housing-run", {"program": "housing", "arch": "mlp"})
    for program in ("cifar", "anomaly"):
        out = tmp_path / f"{program}-run"
        expect_clean_failure(
            program,
            [*program_args(program, datasets, out), "--resume", str(housing_ckpt)],
            f"program is 'housing', expected '{program}'",
            out,
        )
    # Same program, other architecture: refused before any weight is touched.
    other_arch = foreign_checkpoint(tmp_path / "anomaly-other-arch", {"program": "anomaly", "arch": "autoencoder-512"})
    out = tmp_path / "anomaly-resumed"
    expect_clean_failure(
        "anomaly",
        [*program_args("anomaly", datasets, out), "--resume", str(other_arch)],
        "checkpoint does not match this run",
        out,
    )


# ---------------------------------------------------------------- run directories are never lost


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".run.lock"}


def _train(program: str, data: dict[str, Path], out: Path, *extra: str) -> None:
    result = run_program(f"{program}/train.py", [*program_args(program, data, out), *extra], nproc=2, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_run_directory_is_written_only_by_the_run_it_holds(datasets, tmp_path):
    """A finished housing run: launching housing again without --resume, or anomaly with or
    without --resume, into its --out-dir is refused and changes no byte; --overwrite replaces it."""
    out = tmp_path / "run"
    _train("housing", datasets, out)
    before = _files(out)
    assert {"summary.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.prev.pt"} <= set(before)
    expect_clean_failure(
        "housing",
        program_args("housing", datasets, out),
        "already holds a housing run (checkpoint.pt, checkpoint.prev.pt, metrics.jsonl, "
        "summary.json); pass --resume to continue it, --overwrite to replace it",
    )
    expect_clean_failure("anomaly", program_args("anomaly", datasets, out), "already holds a housing run")
    expect_clean_failure(
        "anomaly", [*program_args("anomaly", datasets, out), "--resume"], "holds a run of housing, not of anomaly"
    )
    assert _files(out) == before
    _train("anomaly", datasets, out, "--overwrite")
    assert _files(out)["summary.json"] != before["summary.json"] and (out / "detector.pt").exists()


def test_a_second_launch_into_a_directory_in_use_is_refused(datasets, tmp_path):
    import json
    import threading

    out = tmp_path / "run"
    first: dict = {}
    # The first launch holds the folder for at least 20 s: its baseline fit sleeps that long
    # (tests/slow_extras.py), so the second launch meets it however fast the machine trains.
    args = [arg for arg in program_args("housing", datasets, out) if arg != "--no-baselines"]
    assert len(args) == len(program_args("housing", datasets, out)) - 1
    running = threading.Thread(
        target=lambda: first.update(
            result=run_program("tests/slow_extras.py", args, nproc=2, timeout=120, env={"SLOW_BASELINES_S": "20"})
        )
    )
    running.start()
    deadline = time.time() + 60
    while time.time() < deadline and not (out / ".run.lock").exists():
        time.sleep(0.05)
    while time.time() < deadline and "pid" not in (out / ".run.lock").read_text():
        time.sleep(0.05)
    holder = json.loads((out / ".run.lock").read_text())
    expect_clean_failure(
        "housing",
        [*program_args("housing", datasets, out), "--resume"],
        f"is being written by another launch (housing, pid {holder['pid']}",
    )
    running.join()
    assert first["result"].returncode == 0, first["result"].stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # one writer: no line twice


@pytest.mark.parametrize(
    "program,changed,message",
    [
        ("housing", ["--seed", "1"], "--seed is 1 here but 0 in the run being resumed"),
        ("cifar", ["--epochs", "1"], "--epochs is 1 here but 2 in the run being resumed"),
        ("cifar", ["--batch-size", "6"], "--batch-size is 6 here but 12 in the run being resumed"),
        ("anomaly", ["--seed", "1"], "--seed is 1 here but 0 in the run being resumed"),
        ("anomaly", ["--hidden", "16,4"], "--hidden is (16, 4) here but (32, 8) in the run being resumed"),
    ],
)
def test_resume_refuses_settings_that_change_the_run(datasets, tmp_path, program, changed, message):
    out = tmp_path / "run"
    two_epochs = ["--epochs", "2"] if program == "cifar" else []
    _train(program, datasets, out, *two_epochs)
    before = _files(out)
    expect_clean_failure(program, [*program_args(program, datasets, out), *two_epochs, "--resume", *changed], message)
    assert _files(out) == before


# ---------------------------------------------------------------- values that passed validation


def _housing_dir(tmp_path: Path, change) -> Path:
    folder = tmp_path / "housing-data"
    folder.mkdir()
    frame = synthetic_frame()
    frame = change(frame) if change is not None else frame
    frame.to_csv(folder / "housing.csv", index=False)
    return folder


def _set(column: str, value, row: int = 3):
    def change(frame):
        frame = frame.astype({column: object}) if isinstance(value, str) else frame
        frame.loc[row, column] = value
        return frame

    return change


@pytest.mark.parametrize(
    "change,flags,message",
    [
        (lambda f: f.iloc[:60], ["--n-clusters", "48"], "--n-clusters 48 needs at least 48 training rows"),
        (lambda f: f.assign(median_house_value=250_000.0), [], "every row has the same median_house_value"),
        (_set("median_income", 0.0), [], "column 'median_income', row 5: value 0; expected a number above 0"),
        (_set("median_income", "inf"), [], "column 'median_income', row 5: value 'inf' is not finite"),
        (_set("households", -3.0), [], "column 'households', row 5: value -3; expected a number above 0"),
        (lambda f: f.assign(total_bedrooms=float("nan")), [], "column 'total_bedrooms' is empty in every row"),
        (None, ["--seed", "-1"], "--seed must be in 0 .. 2**32 - 1"),
        (None, ["--n-clusters", "5000"], "--n-clusters 5000 needs at least 5000 training rows"),
    ],
    ids=[
        "60-rows",
        "one-price",
        "zero-income",
        "inf-income",
        "negative-count",
        "blank-column",
        "negative-seed",
        "more-clusters-than-rows",
    ],
)
def test_housing_values_a_library_would_crash_on(tmp_path, change, flags, message):
    data = _housing_dir(tmp_path, change)
    out = tmp_path / "run"
    expect_clean_failure(
        "housing", ["--data-dir", str(data), "--out-dir", str(out), *HOUSING_SMALL, *flags], message, out
    )
    assert not out.exists()


def _anomaly_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "anomaly-data"
    folder.mkdir()
    return folder


def test_anomaly_negative_byte_count_is_refused_before_training(tmp_path):
    data = _anomaly_dir(tmp_path)
    frame = make_partition(600, seed=1)
    frame.loc[9, "sbytes"] = -512
    write_partition(frame, data / TRAIN_FILE)
    out = tmp_path / "run"
    expect_clean_failure(
        "anomaly",
        ["--data-dir", str(data), "--out-dir", str(out), *ANOMALY_SMALL],
        "column 'sbytes' row 10 (line 11): value '-512'; expected a count or rate, 0 or more",
        out,
    )


def test_anomaly_damaged_zip_is_one_line(tmp_path):
    data = _anomaly_dir(tmp_path)
    archive = write_partition(make_partition(600, seed=1), data / TRAIN_FILE, zip_name="unsw.zip")
    blob = bytearray(archive.read_bytes())
    middle = len(blob) // 2
    blob[middle : middle + 64] = b"\xff" * 64  # an invalid deflate block (zlib.error), the index intact
    archive.write_bytes(bytes(blob))
    expect_clean_failure(
        "anomaly",
        ["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), *ANOMALY_SMALL],
        f"{archive}: damaged, {TRAIN_FILE} cannot be read from it",
        tmp_path / "run",
    )


def test_anomaly_folder_named_like_a_zip_is_not_read_as_one(tmp_path):
    """A folder called backup.zip beside the real zip: the data is found and the run trains."""
    data = _anomaly_dir(tmp_path)
    (data / "a-backup.zip").mkdir()
    write_partition(make_partition(600, seed=1), data / TRAIN_FILE, zip_name="unsw.zip")
    result = run_program(
        "anomaly/train.py",
        ["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), *ANOMALY_SMALL],
        nproc=2,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-3000:]
