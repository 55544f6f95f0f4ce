"""Files from elsewhere never run code: checkpoints, detector.pt and CIFAR-10 batch files.

Each doctored file holds an object whose unpickling would create a marker file; loading it must
be refused with one ``error:`` line and exit status 2, and the marker must never appear. The
fitted transforms stored as plain data must transform exactly as the fitted originals.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from anomaly import features as afeatures
from anomaly.synthetic import make_partition, write_partition
from cifar import data as cdata
from housing import data as hdata
from tests.launch import error_messages, run_program
from tests.small_data import make_batches_archive, synthetic_frame, write_housing


class MakesMarker:
    """Unpickling this calls ``open(marker, "w")``: any code the file names would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _refused_once(result, marker: Path, *expected: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    messages = error_messages(result.stderr)
    assert len(messages) == 1, result.stderr[-2000:]
    for text in expected:
        assert text in messages[0][1]
    assert not marker.exists()
    return messages[0][1]


def test_doctored_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "meta": {"program": "housing"}, "config": MakesMarker(marker)}, evil)
    args = ["--data-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "out")]
    result = run_program("housing/train.py", [*args, "--eval-only", "--resume", str(evil)])
    message = _refused_once(result, marker, str(evil), "refused", "io.open")
    assert "train again" in message
    # The training path (--resume) reads checkpoints through the same function.
    data = tmp_path / "data"
    data.mkdir()
    synthetic_frame(120).to_csv(data / "housing.csv", index=False)
    result = run_program(
        "housing/train.py",
        [
            "--data-dir",
            str(data),
            "--out-dir",
            str(tmp_path / "o2"),
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--resume",
            str(evil),
        ],
    )
    _refused_once(result, marker, str(evil), "refused")


def test_checkpoint_without_what_eval_needs_is_one_line(tmp_path):
    partial = tmp_path / "partial.pt"
    torch.save({"model": {}, "meta": {"program": "housing"}}, partial)
    result = run_program(
        "housing/train.py",
        ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o"), "--eval-only", "--resume", str(partial)],
    )
    _refused_once(result, tmp_path / "none", str(partial), "'config'", "train again")


def test_doctored_detector_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "detector.pt"
    torch.save({"model": {}, "hidden": [8], "threshold": 1.0, "transform": MakesMarker(marker)}, evil)
    csv = tmp_path / "flows.csv"
    write_partition(make_partition(150, seed=1), csv)
    result = run_program("anomaly/predict.py", [str(csv), "--detector", str(evil)])
    _refused_once(result, marker, str(evil), "refused", "io.open")


def test_doctored_cifar_batch_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    make_batches_archive(tmp_path / "archive.tar.gz")
    batches = tmp_path / "data" / cdata.BATCHES_DIR
    with tarfile.open(tmp_path / "archive.tar.gz") as tf:
        tf.extractall(tmp_path / "data", filter="data")
    (batches / cdata.TEST_BATCH).write_bytes(
        pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3], "filenames": MakesMarker(marker)})
    )
    result = run_program(
        "cifar/train.py",
        ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "o"), "--no-download", "--epochs", "1"],
    )
    _refused_once(result, marker, f"{cdata.TEST_BATCH}: refused", "io.open")


def test_real_cifar_batch_formats_still_load():
    """Python 2's protocol-2 pickles (as distributed) and today's protocols 4 and 5."""
    batch = {
        "data": np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072),
        "labels": [3, 7],
        "batch_label": "training batch 1 of 5",
        "filenames": [b"a.png", b"b.png"],
    }
    for protocol in (2, 4, 5):
        loaded = cdata.unpickle_batch(pickle.dumps(batch, protocol=protocol))
        assert np.array_equal(loaded["data"], batch["data"]) and loaded["data"].dtype == np.uint8
        assert loaded["labels"] == [3, 7] and loaded["filenames"] == [b"a.png", b"b.png"]


def _through_weights_only(tree):
    buffer = io.BytesIO()
    torch.save(tree, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_housing_preprocessor_round_trips_exactly(tmp_path):
    write_housing(tmp_path)
    fitted = hdata.load_housing(tmp_path, seed=0)
    stored = _through_weights_only(hdata.preprocessor_to_plain(fitted.preprocessor))
    rebuilt = hdata.preprocessor_from_plain(stored, "test")
    assert np.array_equal(rebuilt.transform(fitted.raw), fitted.preprocessor.transform(fitted.raw))
    assert list(rebuilt.get_feature_names_out()) == list(fitted.preprocessor.get_feature_names_out())


def test_anomaly_transform_round_trips_exactly():
    frame = make_partition(1500, seed=2)
    transform = afeatures.FeatureTransform(min_frequency=5)
    transform.fit(frame[frame["label"] == 0])
    rebuilt = afeatures.transform_from_plain(_through_weights_only(afeatures.transform_to_plain(transform)), "test")
    assert np.array_equal(rebuilt.transform(frame), transform.transform(frame))
    for got, want in zip(rebuilt.pca_tensors(), transform.pca_tensors()):
        assert np.array_equal(got, want)
    assert rebuilt.describe() == transform.describe()
