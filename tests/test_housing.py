"""housing/: data validation, download, splits, features, and real multi-process runs (the
network's ingredients: tests/test_tabular.py).

Multi-process runs use a small synthetic ``housing.csv`` (same columns as the real file) so the
whole file stays fast; the download test serves the real file when ../shared/data exists.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.model_selection import train_test_split

from common.errors import UserError
from housing import data as hdata
from tests.launch import SHARED_DATA, assert_same_weights, error_messages, resume_copy, run_program
from tests.small_data import HOUSING_SMALL, synthetic_frame

PLOTS = ["loss_curves.png", "predicted_vs_actual.png", "residuals.png", "error_map.png"]


# ---------------------------------------------------------------- reading and validation


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda f: f.drop(columns="median_income"), "missing column 'median_income'"),
        (
            lambda f: f.astype({"population": object}).assign(
                population=lambda d: d.population.where(d.index != 7, "n/a")
            ),
            "column 'population', row 9: non-numeric value 'n/a'",
        ),
        (lambda f: f.iloc[:0], "has a header but no data rows"),
    ],
)
def test_bad_csv_is_one_line_naming_file_and_column(tmp_path, mutate, expected):
    path = tmp_path / "housing.csv"
    mutate(synthetic_frame(20)).to_csv(path, index=False)
    with pytest.raises(UserError) as err:
        hdata.read_housing(path)
    message = str(err.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_empty_file_and_blank_required_value(tmp_path):
    with pytest.raises(UserError, match="file is empty"):
        hdata.read_housing(write_csv(tmp_path / "empty.csv", ""))
    frame = synthetic_frame(20)
    frame.loc[3, "median_income"] = np.nan
    frame.to_csv(tmp_path / "blank.csv", index=False)
    with pytest.raises(UserError, match=r"column 'median_income', row 5: empty value"):
        hdata.read_housing(tmp_path / "blank.csv")


def test_missing_bedrooms_are_allowed_and_imputed(housing_data):
    frame = hdata.read_housing(housing_data / "housing.csv")
    assert frame["total_bedrooms"].isna().sum() == 10
    data = hdata.load_housing(housing_data, seed=0, n_clusters=8)
    assert torch.isfinite(data.train.x).all() and torch.isfinite(data.test.x).all()


# ---------------------------------------------------------------- splits, features, target


def test_test_split_is_the_standard_one():
    train, val, test = hdata.split_rows(20_640, seed=3)
    _, expected_test = train_test_split(np.arange(20_640), test_size=0.2, random_state=42)
    assert np.array_equal(test, expected_test)
    assert len(set(train) | set(val) | set(test)) == 20_640 == len(train) + len(val) + len(test)
    # the seed moves only the train/validation cut
    assert np.array_equal(hdata.split_rows(20_640, seed=4)[2], test)
    assert not np.array_equal(hdata.split_rows(20_640, seed=4)[1], val)


def test_preprocessor_is_fitted_on_training_rows_only(housing_data):
    data = hdata.load_housing(housing_data, seed=0, n_clusters=8)
    scaler = data.preprocessor.named_transformers_["housing_median_age"]
    train_age = data.raw["housing_median_age"].iloc[data.train.rows]
    assert scaler.mean_[0] == pytest.approx(train_age.mean())
    assert data.target_mean == pytest.approx(np.log(data.raw["median_house_value"].iloc[data.train.rows]).mean())


def test_neighbour_prices_leave_each_training_row_out():
    x = np.array([[0.0, 0.0], [0.0, 0.01], [5.0, 5.0], [5.0, 5.01]])
    y = np.array([1.0, 2.0, 3.0, 4.0])
    enc = hdata.NeighbourPrices(ks=(1,))
    train_features = enc.fit_transform(x, y)[:, 0]
    assert train_features.tolist() == [2.0, 1.0, 4.0, 3.0]  # the other point, never itself
    assert enc.transform(x)[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]  # new rows see every training row


def test_decode_clips_to_the_cap_and_rounds_to_dollars():
    z = torch.tensor([-100.0, 0.0, 100.0])
    price = hdata.decode_target(z, mean=12.0, std=1.0)
    assert price.tolist() == [hdata.PRICE_MIN, round(float(np.exp(12.0))), hdata.PRICE_CAP]


# ---------------------------------------------------------------- download


@pytest.fixture
def http_server(tmp_path):
    """A threaded HTTP server on 127.0.0.1 serving tmp_path/'served'."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_verifies_checksum_and_leaves_nothing_on_failure(tmp_path, http_server):
    served, base = http_server
    body = synthetic_frame(30).to_csv(index=False).encode()
    (served / "housing.csv").write_bytes(body)
    good = hashlib.sha256(body).hexdigest()
    dest_dir = tmp_path / "data"

    with pytest.raises(UserError, match="checksum mismatch"):
        hdata.download(dest_dir / "housing.csv", f"{base}/housing.csv", sha256="0" * 64)
    assert list(dest_dir.iterdir()) == []  # no half-written or unverified file
    with pytest.raises(UserError, match="download failed"):
        hdata.download(dest_dir / "housing.csv", f"{base}/nothing-here.csv", sha256=good)
    assert list(dest_dir.iterdir()) == []

    path = hdata.download(dest_dir / "housing.csv", f"{base}/housing.csv", sha256=good)
    assert path.read_bytes() == body and [p.name for p in dest_dir.iterdir()] == ["housing.csv"]


@pytest.mark.skipif(not (SHARED_DATA / "housing.csv").exists(), reason="needs ../shared/data")
def test_locate_downloads_the_real_file_with_its_published_checksum(tmp_path, http_server):
    served, base = http_server
    (served / "housing.csv").write_bytes((SHARED_DATA / "housing.csv").read_bytes())
    path = hdata.locate_csv(tmp_path / "data", url=f"{base}/housing.csv")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hdata.SHA256
    assert len(hdata.read_housing(path)) == 20_640


# ---------------------------------------------------------------- real multi-process runs


def summary(out_dir: Path) -> dict:
    return json.loads((out_dir / "summary.json").read_text())


def train(housing_data: Path, out: Path, nproc: int, *extra: str) -> dict:
    """One housing run with HOUSING_SMALL; its summary."""
    result = run_program(
        "housing/train.py",
        ["--data-dir", str(housing_data), "--out-dir", str(out), *HOUSING_SMALL, *extra],
        nproc=nproc,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "UserWarning" not in result.stderr, result.stderr[-2000:]
    return summary(out)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, housing_data) -> dict[int, Path]:
    """The same DDP training at world size 1 and 2 (run once; tests in its xdist group share it)."""
    root = tmp_path_factory.mktemp("housing-ddp")
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = root / f"w{nproc}"
        train(housing_data, runs[nproc], nproc)
    return runs


def test_extras_outlasting_the_collective_timeout_cost_no_results(tmp_path, housing_data):
    """The baselines and plots come after the results, on rank 0 alone, and no collective
    waits on them: a baseline fit longer than --dist-timeout still ends with summary.json, the
    baselines and exit 0 (it was fitted on the last rank while rank 0 waited to receive it)."""
    out = tmp_path / "run"
    args = ["--data-dir", str(housing_data), "--out-dir", str(out), *HOUSING_SMALL[:-1], "--dist-timeout", "10"]
    result = run_program("tests/slow_extras.py", args, nproc=2, timeout=120, env={"SLOW_BASELINES_S": "14"})
    assert result.returncode == 0, result.stderr[-2000:]
    written = summary(out)
    assert written["test"]["rmse"] > 0 and written["world_size"] == 2
    assert len(written["baselines"]) == 2 and "| HistGradientBoosting" in (out / "results.md").read_text()
    assert all((out / "plots" / name).stat().st_size > 0 for name in PLOTS)


def test_a_non_finite_loss_in_one_ranks_batch_stops_both_ranks_with_one_line(tmp_path):
    """One price of $1e200 makes the dollar loss infinite in one rank's share of a batch: both
    ranks stop with the same line, naming the step and that rank (before: that rank alone
    stopped, and the other died in its next collective with a gloo traceback)."""
    frame = synthetic_frame()
    frame.loc[5, "median_house_value"] = 1e200
    frame.to_csv(tmp_path / "housing.csv", index=False)
    result = run_program(
        "housing/train.py",
        ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run"), *HOUSING_SMALL],
        nproc=2,
        timeout=90,
    )
    assert result.returncode != 0
    errors = error_messages(result.stderr)
    assert sorted(rank for rank, _ in errors) == ["0", "1"], result.stderr[-3000:]
    assert errors[0][1] == errors[1][1] and "loss became inf at step" in errors[0][1], errors
    assert "only (its share of that batch); check the training data" in errors[0][1]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.xdist_group("housing-ddp-runs")
def test_world_sizes_agree_and_checkpoint_eval_is_identical(tmp_path, housing_data, ddp_runs):
    runs = {nproc: summary(out) for nproc, out in ddp_runs.items()}
    for nproc in (1, 2):
        assert runs[nproc]["world_size"] == nproc
    # The same optimisation at any world size: DDP's gradient all-reduce adds in another order,
    # so the weights agree to float rounding; the dollar metrics, from predictions rounded to
    # whole dollars, are equal, and the log-space loss agrees to float rounding.
    assert_same_weights(ddp_runs[2], ddp_runs[1])
    for key in ("rmse", "mae", "r2", "n"):
        assert runs[2]["test"][key] == runs[1]["test"][key], key
    assert runs[2]["test"]["loss"] == pytest.approx(runs[1]["test"]["loss"], rel=1e-7)

    # The run directory has everything a person looks at.
    out2 = ddp_runs[2]
    assert len((out2 / "metrics.jsonl").read_text().splitlines()) == 3
    assert all((out2 / "plots" / name).stat().st_size > 0 for name in PLOTS)
    assert "| MLP" in (out2 / "results.md").read_text()

    # Resuming from the epoch-2 checkpoint ends exactly where the uninterrupted run did.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(ddp_runs[1] / "checkpoint.prev.pt", resumed / "checkpoint.pt")
    result = run_program(
        "housing/train.py",
        ["--data-dir", str(housing_data), "--out-dir", str(resumed), "--resume", *HOUSING_SMALL],
        nproc=1,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert summary(resumed)["test"] == runs[1]["test"]
    assert summary(resumed)["epochs_run"] == 1

    # Same checkpoint, other world size: bit-identical metrics.
    result = run_program(
        "housing/train.py",
        ["--eval-only", "--resume", str(out2), "--data-dir", str(housing_data), "--out-dir", str(tmp_path / "e3")],
        nproc=3,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated = json.loads((tmp_path / "e3" / "eval.json").read_text())
    assert evaluated["world_size"] == 3
    for key in ("rmse", "mae", "r2"):
        assert evaluated["test"][key] == runs[2]["test"][key]


@pytest.mark.xdist_group("housing-ddp-runs")
def test_fsdp_trains_like_ddp_and_checkpoints_cross_strategies(tmp_path, housing_data, ddp_runs):
    """--strategy fsdp: DDP's weights at half the memory; checkpoints move both ways."""
    fsdp = train(housing_data, tmp_path / "fsdp", 2, "--strategy", "fsdp")
    ddp = summary(ddp_runs[2])
    assert_same_weights(tmp_path / "fsdp", ddp_runs[2])  # 3 epochs x 5 steps of AdamW
    assert fsdp["test"]["rmse"] == pytest.approx(ddp["test"]["rmse"], rel=1e-5)
    ratio = fsdp["memory_per_rank"]["total_bytes"] / ddp["memory_per_rank"]["total_bytes"]
    assert 0.45 < ratio < 0.55, ratio

    # fsdp on 2 processes -> ddp on 1, from the epoch-2 checkpoint: ends where ddp did.
    to_ddp = resume_copy(tmp_path / "fsdp", tmp_path / "fsdp-to-ddp1")
    train(housing_data, to_ddp, 1, "--resume")
    assert_same_weights(to_ddp, ddp_runs[1])
    # ddp on 1 process -> fsdp on 2.
    to_fsdp = resume_copy(ddp_runs[1], tmp_path / "ddp1-to-fsdp")
    resumed = train(housing_data, to_fsdp, 2, "--resume", "--strategy", "fsdp")
    assert_same_weights(to_fsdp, ddp_runs[1])
    assert resumed["epochs_run"] == 1
    assert resumed["test"]["rmse"] == pytest.approx(summary(ddp_runs[1])["test"]["rmse"], rel=1e-5)


@pytest.mark.parametrize(
    "mutate,column",
    [
        (lambda f: f.drop(columns="households"), "households"),
        (
            lambda f: f.astype({"latitude": object}).assign(latitude=lambda d: d.latitude.where(d.index != 2, "north")),
            "latitude",
        ),
        (None, None),
    ],
)
def test_bad_csv_fails_every_rank_without_hanging(tmp_path, mutate, column):
    folder = tmp_path / "bad"
    folder.mkdir()
    path = folder / "housing.csv"
    if mutate is None:
        path.write_text("")
    else:
        mutate(synthetic_frame(40)).to_csv(path, index=False)
    out = tmp_path / "out"
    result = run_program("housing/train.py", ["--data-dir", str(folder), "--out-dir", str(out)], nproc=2, timeout=60)
    assert result.returncode != 0
    errors = error_messages(result.stderr)
    assert sorted(rank for rank, _ in errors) == ["0", "1"], result.stderr[-3000:]  # each rank says it
    for _, text in errors:
        assert str(path) in text and (column is None or repr(column) in text)
    assert not out.exists()  # validated before the run directory was made


def test_tune_and_features_spread_work_across_ranks(tmp_path, housing_data):
    out = tmp_path / "tune"
    result = run_program(
        "housing/tune.py",
        [
            "--data-dir",
            str(housing_data),
            "--out-dir",
            str(out),
            "--grid",
            "ensemble=1,2",
            *HOUSING_SMALL[:4],
            "--n-clusters",
            "8",
            "--quantile",
            "--embedding",
            "periodic",
            "--embed-bins",
            "4",
        ],
        nproc=2,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    tuned = summary(out)
    ranks = {int(row[0]) % 2 for row in tuned["results"]}
    assert len(tuned["results"]) == 2 and ranks == {0, 1}
    assert tuned["test"]["rmse"] > 0 and len(tuned["baselines"]) == 2
    assert tuned["config"]["quantile"] and tuned["config"]["embedding"] == "periodic"
    table = (out / "tune.md").read_text()
    assert table.count("\n| ") >= 2 + 3 and "HistGradientBoosting" in table

    # Under FSDP: 15 groups over 2 ranks, so each rank shuffles a different number of them and
    # must not run a collective per group (it hung).
    out = tmp_path / "features"
    result = run_program(
        "housing/features.py",
        [
            "--data-dir",
            str(housing_data),
            "--out-dir",
            str(out),
            *HOUSING_SMALL[:8],
            "--subset-sizes",
            "2,all",
            "--repeats",
            "1",
            "--strategy",
            "fsdp",
        ],
        nproc=2,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ranked = summary(out)
    assert sorted(ranked["ranking"]) == sorted(hdata.FEATURE_GROUPS)
    assert [int(k) for k, _ in ranked["subsets"]] == [2, len(hdata.FEATURE_GROUPS)]
    assert "| 1 |" in (out / "features.md").read_text()
    assert (out / "plots" / "feature_importance.png").stat().st_size > 0


def test_gradient_boosting_baseline_sees_the_nets_features_and_target(housing_data):
    """The HGB row of every results table: fitted on data.train.x / data.train.y."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    from housing import report

    data = hdata.load_housing(housing_data, seed=0, n_clusters=8)
    settings = {**report.HGB_SETTINGS, "max_iter": 30}  # a tenth of a second, not seconds
    baselines = report.run_baselines(data, seed=0, hgb_settings=settings)
    hgb = baselines[report.HGB_NAME]
    direct = HistGradientBoostingRegressor(**settings, early_stopping=False, random_state=0)
    direct.fit(data.train.x.numpy(), data.train.y.numpy())
    pred = hdata.decode_target(torch.from_numpy(direct.predict(data.test.x.numpy())), data.target_mean, data.target_std)
    assert hgb["rmse"] == pytest.approx(float(((pred - data.test.price) ** 2).mean().sqrt()), rel=1e-12)
    assert hgb["settings"] == settings and hgb["fit_s"] > 0
    table = report.results_table({"rmse": hgb["rmse"] + 100, "mae": 0.0, "r2": 0.0}, baselines, "x")
    assert "$100 above gradient boosting on the same features and target" in table
