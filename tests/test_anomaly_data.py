"""anomaly/: reading, validating and splitting UNSW-NB15 files; the feature transform."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from anomaly.data import TEST_FILE, TRAIN_FILE, feature_columns, load_frames, read_csv_file, seen_in, split_data
from anomaly.features import FeatureTransform
from anomaly.synthetic import make_partition, make_raw, write_partition, write_raw
from common.errors import UserError
from tests.launch import SHARED_DATA


def test_partition_with_bom_inside_zip_is_found(tmp_path):
    frame = make_partition(300, seed=1)
    write_partition(frame, tmp_path / TRAIN_FILE, bom=True, zip_name="UNSW_NB15_82332.csv.zip")
    frames, time_column = load_frames(tmp_path)
    assert list(frames) == ["all"] and time_column is None
    got = frames["all"]
    assert len(got) == 300 and got.columns[0] == "id"
    assert got["label"].tolist() == frame["label"].tolist()
    assert got["state"].str.islower().all()


def test_raw_headerless_files_get_names_times_and_clean_categories(tmp_path):
    write_raw(make_raw(200, seed=2), tmp_path / "UNSW-NB15_2.csv")
    write_raw(make_raw(100, seed=3, start_time=1421920000), tmp_path / "UNSW-NB15_1.csv")
    frames, time_column = load_frames(tmp_path)
    frame = frames["all"]
    assert time_column == "stime" and len(frame) == 300
    assert frame["stime"].is_monotonic_increasing
    assert set(frame.loc[frame["label"] == 0, "attack_cat"]) == {"Normal"}
    assert "DoS" in set(frame["attack_cat"]) and " DoS " not in set(frame["attack_cat"])
    assert frame["ct_flw_http_mthd"].dtype == np.float64  # blanks read as 0


def test_absent_data_says_where_to_get_it(tmp_path):
    with pytest.raises(UserError) as err:
        load_frames(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert TRAIN_FILE in message and TEST_FILE in message and "UNSW-NB15_1.csv" in message
    assert "unsw.edu.au" in message and "kaggle" in message.lower()


@pytest.mark.parametrize("case", ["missing_column", "non_numeric", "empty", "header_only"])
def test_bad_csv_names_file_column_and_row(tmp_path, case):
    frame = make_partition(50, seed=4)
    path = tmp_path / TRAIN_FILE
    if case == "missing_column":
        write_partition(frame.drop(columns=["sbytes"]), path)
        expect = ["'sbytes'", "line 1"]
    elif case == "non_numeric":
        frame = frame.astype({"dur": object})
        frame.loc[6, "dur"] = "fast"
        write_partition(frame, path)
        expect = ["'dur'", "row 7", "line 8", "'fast'"]
    elif case == "empty":
        path.write_text("")
        expect = ["empty"]
    else:
        write_partition(frame.iloc[:0], path)
        expect = ["no rows"]
    with pytest.raises(UserError) as err:
        load_frames(tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    for part in expect:
        assert part in message, message


def test_random_split_is_stratified_seeded_and_marks_duplicates(tmp_path):
    frame = make_partition(2000, seed=5)
    frame = pd.concat([frame, frame.iloc[:200].assign(id=np.arange(2001, 2201))], ignore_index=True)
    write_partition(frame, tmp_path / TRAIN_FILE)
    a = split_data(tmp_path, 0.15, 0.3, seed=7, split="random")
    b = split_data(tmp_path, 0.15, 0.3, seed=7, split="random")
    assert a.test["id"].tolist() == b.test["id"].tolist()
    ids = [set(s["id"]) for s in (a.train, a.val, a.test)]
    assert sum(map(len, ids)) == len(frame) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert abs(len(a.test) / len(frame) - 0.3) < 0.01
    shares = [s["attack_cat"].value_counts(normalize=True) for s in (a.train, a.test)]
    assert (shares[0] - shares[1]).abs().max() < 0.02
    # Test rows whose copy (other id, same features) landed in train are flagged.
    seen = a.test_seen_in_train
    assert 0 < seen.sum() < len(a.test)
    copies = a.test[seen]
    assert copies["id"].isin(range(1, 201)).any() or copies["id"].ge(2001).any()


def test_grouped_split_keeps_identical_rows_on_one_side(tmp_path):
    """The default split: every copy of a feature row lands where the row does."""
    frame = make_partition(2000, seed=5)
    # 200 rows repeated once, 20 rows repeated 10 times: groups of 2 and 11 identical rows.
    copies = [frame.iloc[:200]] + [frame.iloc[200:220]] * 10
    frame = pd.concat([frame, *copies], ignore_index=True).assign(id=lambda f: np.arange(1, len(f) + 1))
    write_partition(frame, tmp_path / TRAIN_FILE)
    a = split_data(tmp_path, 0.15, 0.3, seed=7)
    assert a.test["id"].tolist() == split_data(tmp_path, 0.15, 0.3, seed=7).test["id"].tolist()
    ids = [set(s["id"]) for s in (a.train, a.val, a.test)]
    assert sum(map(len, ids)) == len(frame) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert not a.test_seen_in_train.any()
    assert not seen_in(a.train, a.val).any() and not seen_in(a.val, a.test).any()
    # Every repeated row sits with all its copies.
    features = feature_columns(frame)
    side = {}
    for name, part in (("train", a.train), ("val", a.val), ("test", a.test)):
        for key in pd.util.hash_pandas_object(part[features], index=False):
            assert side.setdefault(key, name) == name
    assert abs(len(a.test) / len(frame) - 0.3) < 0.03  # groups move whole, so only roughly 30%
    shares = [s["attack_cat"].value_counts(normalize=True) for s in (a.train, a.test)]
    assert (shares[0] - shares[1]).abs().max() < 0.03
    # The random split of the same file does put copies of test rows into train.
    assert split_data(tmp_path, 0.15, 0.3, seed=7, split="random").test_seen_in_train.sum() > 20


def test_two_partitions_use_the_official_test_set(tmp_path):
    write_partition(make_partition(800, seed=6), tmp_path / TRAIN_FILE)
    write_partition(make_partition(300, seed=8), tmp_path / TEST_FILE, bom=False)
    splits = split_data(tmp_path, 0.2, 0.3, seed=0)
    assert len(splits.test) == 300 and len(splits.train) + len(splits.val) == 800
    assert "official" in splits.source


def test_feature_transform_fits_on_train_and_scores_new_rows(tmp_path):
    train = make_partition(1500, seed=9)
    normal = train[train["label"] == 0]
    transform = FeatureTransform(min_frequency=5, pca_variance=0.99)
    x = transform.fit_transform(normal)
    assert x.shape == (len(normal), transform.n_features) and np.isfinite(x).all()
    # Scaling fitted on these rows: numeric columns are centred there.
    numeric = [i for i, n in enumerate(transform.feature_names) if "_" not in n or n.startswith("log_")]
    assert np.abs(x[:, numeric].mean(axis=0)).max() < 1e-3
    assert 0 < transform.n_components < transform.n_features
    # New data with an unseen protocol and a new sttl value maps to the infrequent level, no error.
    new = make_partition(20, seed=10)
    new.loc[0, "proto"], new.loc[1, "sttl"] = "never-seen", 77
    y = transform.transform(new)
    assert y.shape == (20, transform.n_features) and np.isfinite(y).all()
    # Counts leave the row itself out: a training row scored again counts its own copy.
    counts = transform.feature_names.index("count_sizes")
    again = transform.transform(normal)
    assert (again[:, counts] >= x[:, counts]).all() and (again[:, counts] > x[:, counts]).any()


def test_read_csv_file_accepts_unlabelled_partition_rows(tmp_path):
    frame = make_partition(30, seed=11).drop(columns=["id", "attack_cat", "label"])
    path = tmp_path / "new.csv"
    frame.to_csv(path, index=False)
    got = read_csv_file(path, need_labels=False)
    assert len(got) == 30 and "label" not in got.columns


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_real_partition_loads_from_the_zip():
    frames, _ = load_frames(SHARED_DATA)
    frame = frames["all"]
    assert len(frame) == 82332 and (frame["label"] == 0).sum() == 37000
    assert frame["attack_cat"].nunique() == 10
