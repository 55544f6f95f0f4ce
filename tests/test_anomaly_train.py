"""anomaly/: the three detectors end to end: exact metrics at 1, 2, 3 processes, the hybrid's
parts, bad input, predict, compare, the novel-attack study."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anomaly.data import TRAIN_FILE
from anomaly.model import PARTS, combined_score, thresholds_tensor
from anomaly.predict import predict_csv
from anomaly.synthetic import make_partition, write_partition
from common.dist import DistInfo
from common.errors import UserError
from common.tensorboard import tensorboard_available
from tests.launch import SAME_WEIGHTS, SHARED_DATA, assert_same_weights, resume_copy, run_program
from tests.small_data import ANOMALY_SMALL, write_anomaly

HYBRID = ["--detector", "hybrid"]
# The shared run: both networks, so every path is exercised.
SINGLE = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
METRICS = ("precision", "recall", "f1", "tp", "fp", "tn", "fn", "roc_auc", "pr_auc")


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


# Tests that use ``trained`` run on one xdist worker, so its training runs once.
SHARES_TRAINED = pytest.mark.xdist_group("anomaly-trained")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small synthetic dataset (zipped, BOM header) and a 2-process hybrid run on it."""
    root = tmp_path_factory.mktemp("anomaly")
    data = write_anomaly(root / "data")
    run = root / "run"
    tensorboard = ["--tensorboard"] if tensorboard_available() else []  # it only adds files
    result = run_program(
        "anomaly/train.py",
        ["--data-dir", str(data), "--out-dir", str(run), *ANOMALY_SMALL, *HYBRID, *tensorboard],
        nproc=2,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return data, run


@SHARES_TRAINED
def test_two_process_training_writes_everything(trained):
    _, run = trained
    summary = _summary(run)
    assert summary["world_size"] == 2 and summary["detector"] == "hybrid" and summary["split"] == "grouped"
    assert summary["test"]["f1"] > 0.9  # synthetic attacks are easy; a broken pipeline is not
    assert summary["test"]["n"] == summary["data"]["test_rows"]
    assert summary["data"]["test_seen_in_train"] == 0  # the grouped split: no copies in train
    assert summary["test_unseen"]["n"] == summary["data"]["test_rows"]
    assert set(summary["thresholds"]) == {"classifier", "disagreement", "autoencoder"}
    assert set(summary["parts"]) == {"classifier", "classifier+disagreement", "autoencoder"}
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    for name in ("loss", "scores_val", "scores_test", "pr_curve", "confusion", "per_attack_cat", "timeline"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000, name
    assert (run / "detector.pt").exists() and (run / "checkpoint.pt").exists()


@SHARES_TRAINED
def test_tensorboard_has_rank_zeros_scalars_of_metrics_jsonl(trained):
    pytest.importorskip("tensorboard")
    from tests.launch import event_scalars

    _, run = trained
    assert [f.parent for f in run.rglob("events.out.tfevents.*")] == [run / "tensorboard"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    got = event_scalars(run / "tensorboard")
    for tag in ("train_loss", "val_loss", "lr", "samples_per_s"):
        assert [step for step, _ in got[tag]] == [row["epoch"] for row in rows]
        assert [v for _, v in got[tag]] == pytest.approx([row[tag] for row in rows], rel=1e-6), tag


def _same_metrics_at(nprocs, data, run, tmp_path, *extra, finished_resume_at=None):
    """Evaluate ``run``'s checkpoint at each of ``nprocs`` processes with ``--eval-only`` (at
    ``finished_resume_at`` processes by resuming the finished run instead); every figure must
    equal the training run's own (which ran at 2 processes)."""
    reference = _summary(run)
    for nproc in nprocs:
        out = tmp_path / f"eval{nproc}"
        resume_only = nproc == finished_resume_at
        result = run_program(
            "anomaly/train.py",
            [
                "--data-dir",
                str(data),
                "--out-dir",
                str(out),
                *([] if resume_only else ["--eval-only"]),
                "--resume",
                str(run),
                *ANOMALY_SMALL,
                *extra,
            ],
            nproc=nproc,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        if resume_only:
            summary = _summary(out)
            assert summary["epochs_run"] == 0
        else:
            summary = json.loads((out / "eval.json").read_text())
            assert summary["checkpoint"] == str(run / "checkpoint.pt") and not (out / "summary.json").exists()
        assert summary["world_size"] == nproc
        assert summary["thresholds"] == reference["thresholds"], (nproc, summary["thresholds"], reference["thresholds"])
        for part in ("test", "test_unseen"):
            for key in METRICS:
                assert summary[part][key] == reference[part][key], (nproc, part, key)
        assert summary["per_attack_cat"] == reference["per_attack_cat"]
        assert summary["parts"] == reference["parts"]


@SHARES_TRAINED
def test_same_checkpoint_gives_identical_metrics_at_1_2_3_processes(trained, tmp_path):
    """The hybrid, whose summary also measures its classifier and autoencoder parts alone
    (the same networks and scoring code as those detectors trained alone)."""
    data, run = trained
    _same_metrics_at((1, 2, 3), data, run, tmp_path, *HYBRID, finished_resume_at=2)


@SHARES_TRAINED
def test_eval_only_scores_with_the_saved_feature_transform(trained, tmp_path, monkeypatch):
    """--eval-only uses the transform saved with the weights (as housing's uses its saved
    preprocessor); it fits nothing again, which on another copy of the data would give features
    the weights were not trained on. Same figures as the training run."""
    from anomaly import train
    from anomaly.features import FeatureTransform
    from common.checkpoint import load_tensors_file

    data, run = trained
    state = {**load_tensors_file(run / "checkpoint.pt"), "loaded_from": str(run / "checkpoint.pt")}
    cfg = train.parse_args(
        ["--data-dir", str(data), "--out-dir", str(tmp_path), "--eval-only", "--resume", str(run), *HYBRID]
    )

    def no_refit(self, *args, **kwargs):
        raise AssertionError("--eval-only fitted the feature transform again")

    monkeypatch.setattr(FeatureTransform, "fit_transform", no_refit)
    result = train.evaluate_checkpoint(cfg.for_evaluation(state["config"], state["loaded_from"]), state, SINGLE)
    reference = _summary(run)
    assert result["thresholds"] == reference["thresholds"]
    for key in METRICS:
        assert result["test"][key] == reference["test"][key], key


@SHARES_TRAINED
@pytest.mark.parametrize("detector", ["classifier", "autoencoder"])
def test_each_detector_alone_evaluates_exactly_and_the_classifier_is_the_hybrids_part(trained, tmp_path, detector):
    """Trained alone on 2 processes, each detector's checkpoint evaluates identically at 1 and 3
    processes; the classifier holds exactly the weights of the hybrid's classifier part (both
    ran on 2 processes: dropout masks are drawn per rank)."""
    data, hybrid_run = trained
    run = tmp_path / "run"
    _train(data, run, 2, "--detector", detector)
    if detector == "classifier":
        alone = torch.load(run / "detector.pt", weights_only=True)["model"]
        hybrid = torch.load(hybrid_run / "detector.pt", weights_only=True)["model"]
        part = {k.removeprefix("classifier."): v for k, v in hybrid.items() if k.startswith("classifier.")}
        torch.testing.assert_close(part, alone, **SAME_WEIGHTS)
    _same_metrics_at((1, 3), data, run, tmp_path, "--detector", detector)


@SHARES_TRAINED
def test_predict_scores_a_new_csv_in_one_call(trained, tmp_path):
    _, run = trained
    new = make_partition(400, seed=99).drop(columns=["id"])
    path = tmp_path / "new_flows.csv"
    new.to_csv(path, index=False)
    scored = predict_csv(path, run / "detector.pt")
    assert len(scored) == 400 and {"score", "is_attack"} <= set(scored.columns)
    hit = (scored["is_attack"] == (scored["label"] == 1)).mean()
    assert hit > 0.8  # 3 epochs on 1,000 normal rows; the real-data figures are in the README


def _train(data, out, nproc, *extra):
    result = run_program(
        "anomaly/train.py",
        ["--data-dir", str(data), "--out-dir", str(out), *ANOMALY_SMALL, *extra],
        nproc=nproc,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return _summary(out)


@SHARES_TRAINED
def test_fsdp_trains_like_ddp_and_checkpoints_cross_strategies(trained, tmp_path):
    """--strategy fsdp: DDP's weights, detector and F1 at half the memory; checkpoints move."""
    data, ddp_run = trained
    fsdp = _train(data, tmp_path / "fsdp", 2, "--strategy", "fsdp", *HYBRID)
    ddp = _summary(ddp_run)
    assert_same_weights(tmp_path / "fsdp", ddp_run)
    detectors = [torch.load(run / "detector.pt", weights_only=True)["model"] for run in (tmp_path / "fsdp", ddp_run)]
    torch.testing.assert_close(detectors[0], detectors[1], **SAME_WEIGHTS)  # plain tensors, whole
    assert fsdp["test"]["f1"] == pytest.approx(ddp["test"]["f1"], abs=0.01)
    ratio = fsdp["memory_per_rank"]["total_bytes"] / ddp["memory_per_rank"]["total_bytes"]
    assert 0.45 < ratio < 0.55, ratio

    # fsdp -> ddp from the epoch-2 checkpoint: ends where ddp did; and ddp -> fsdp. Both on 2
    # processes: the classifier's dropout masks are drawn per rank, so its trajectory depends on
    # the world size (test_housing crosses world sizes with the strategies).
    to_ddp = resume_copy(tmp_path / "fsdp", tmp_path / "fsdp-to-ddp")
    assert _train(data, to_ddp, 2, "--resume", *HYBRID)["epochs_run"] == 1
    assert_same_weights(to_ddp, ddp_run)
    to_fsdp = resume_copy(ddp_run, tmp_path / "ddp-to-fsdp")
    assert _train(data, to_fsdp, 2, "--resume", "--strategy", "fsdp", *HYBRID)["epochs_run"] == 1
    assert_same_weights(to_fsdp, ddp_run)


@pytest.mark.parametrize("case", ["missing_column", "non_numeric"])
def test_bad_csv_fails_on_every_rank_with_one_line_and_writes_nothing(tmp_path, case):
    frame = make_partition(400, seed=5)
    if case == "missing_column":
        frame = frame.drop(columns=["dbytes"])
        expect = "'dbytes'"
    else:
        frame = frame.astype({"sttl": object})
        frame.loc[41, "sttl"] = "n/a"
        expect = "column 'sttl' row 42"
    data = tmp_path / "data"
    data.mkdir()
    write_partition(frame, data / TRAIN_FILE)
    out = tmp_path / "run"
    nproc = 2 if case == "missing_column" else 1  # one multi-process case is enough
    result = run_program(
        "anomaly/train.py", ["--data-dir", str(data), "--out-dir", str(out), *ANOMALY_SMALL], nproc=nproc, timeout=60
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0] and TRAIN_FILE in errors[0], result.stderr[-2000:]
    # torchrun prints its own ChildFailedError traceback; the program itself must not.
    assert "/anomaly/" not in result.stderr.split("error:")[0] and "UserError" not in result.stderr
    assert not out.exists()


@SHARES_TRAINED
def test_compare_table_has_every_method_and_the_run_rows(trained, tmp_path):
    data, run = trained
    out = tmp_path / "compare"
    result = run_program(
        "anomaly/compare.py", ["--data-dir", str(data), "--runs", str(run), "--out-dir", str(out)], timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    methods = [row["method"] for row in report["rows"]]
    assert methods[0] == "all-attack baseline" and report["rows"][0]["recall"] == 1.0
    for name in (
        "PCA reconstruction",
        "IsolationForest",
        "one-class SVM",
        "gradient boosting, tuned",
        "hybrid network",
    ):
        assert any(m.startswith(name) for m in methods), name
    assert report["settings"]["seed"] == 0 and report["settings"]["split"] == "grouped"
    hybrid = next(row for row in report["rows"] if row["method"].startswith("hybrid"))
    assert hybrid["f1"] == _summary(run)["test"]["f1"]
    assert "| all-attack baseline |" in (out / "compare.md").read_text()


@SHARES_TRAINED
def test_compare_over_seeds_measures_each_seed_on_its_own_split_then_mean_and_spread(trained, tmp_path):
    """Runs of two seeds: a table per seed (each its own split, boosting fitted on it), then
    each method's F1 per seed, mean and spread; a run with other split settings is refused."""
    data, run = trained
    other = tmp_path / "seed1"
    seed1 = _train(data, other, 1, *HYBRID, "--seed", "1")
    out = tmp_path / "compare"
    result = run_program(
        "anomaly/compare.py",
        ["--data-dir", str(data), "--runs", str(run), str(other), "--out-dir", str(out)],
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    assert [r["settings"]["seed"] for r in report["seeds"]] == [0, 1]
    assert report["seeds"][0]["test_rows"] == report["seeds"][1]["test_rows"]  # same size, other rows
    summary = {r["method"]: r for r in report["summary"]}
    hybrid = summary["hybrid network"]
    assert hybrid["f1"] == [_summary(run)["test"]["f1"], seed1["test"]["f1"]]
    assert hybrid["mean"] == pytest.approx(sum(hybrid["f1"]) / 2)
    assert hybrid["spread"] == pytest.approx(abs(hybrid["f1"][0] - hybrid["f1"][1]))
    boosting = summary["gradient boosting, tuned"]["f1"]
    assert boosting == [
        next(r["f1"] for r in report["seeds"][i]["rows"] if r["method"].startswith("gradient")) for i in (0, 1)
    ]
    text = (out / "compare.md").read_text()
    assert "## Seed 0" in text and "## Seed 1" in text and "| hybrid network |" in text
    random_split = tmp_path / "random"
    _train(data, random_split, 1, *HYBRID, "--split", "random")
    refused = run_program(
        "anomaly/compare.py",
        ["--data-dir", str(data), "--runs", str(run), str(random_split), "--out-dir", str(tmp_path / "no")],
        timeout=120,
    )
    assert refused.returncode != 0 and "its split differ" in refused.stderr


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_real_data_subset_trains_and_beats_the_trivial_baseline(tmp_path):
    out = tmp_path / "run"
    result = run_program(
        "anomaly/train.py",
        [
            "--data-dir",
            str(SHARED_DATA),
            "--out-dir",
            str(out),
            "--max-rows",
            "4000",
            "--epochs",
            "10",
            "--batch-size",
            "48",
        ],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _summary(out)
    share = summary["test"]["tp"] + summary["test"]["fn"]
    trivial_f1 = 2 * share / (share + summary["test"]["n"])
    assert summary["test"]["f1"] > trivial_f1 + 0.05


def test_raw_files_give_features_and_a_timeline_over_stime(tmp_path):
    """In-process (no launch): the raw layout through build_data and the time-series picture."""
    import numpy as np

    from anomaly import plots
    from anomaly.synthetic import make_raw, write_raw
    from anomaly.train import build_data, parse_args

    data = tmp_path / "data"
    data.mkdir()
    for i in (1, 2):
        write_raw(make_raw(800, seed=i, start_time=1421927377 + 4000 * i), data / f"UNSW-NB15_{i}.csv")
    cfg = parse_args(["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), *ANOMALY_SMALL])
    built = build_data(cfg, SINGLE)
    assert built.splits.time_column == "stime" and len(built.splits.test) == 480
    assert "rate" not in built.transform.input_names and np.isfinite(built.x["test"].numpy()).all()
    scores = np.linspace(0, 1, 480)
    plots.timeline(
        scores,
        built.splits.test["label"].to_numpy(),
        built.splits.test["stime"].to_numpy() * 1.0,
        "stime",
        0.5,
        tmp_path / "t.png",
        has_time=True,
    )
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_novel_study_holds_each_category_out_and_reports_every_detector(trained, tmp_path):
    """anomaly/novel.py on two categories: each held out of train and validation, kept in test."""
    data, _ = trained
    out = tmp_path / "novel"
    result = run_program(
        "anomaly/novel.py",
        [
            "--data-dir",
            str(data),
            "--out-dir",
            str(out),
            *ANOMALY_SMALL,
            "--epochs",
            "2",
            "--categories",
            "DoS,Exploits",
        ],
        nproc=2,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "novel.json").read_text())
    assert list(report["rows"]) == ["DoS", "Exploits"]
    for category, row in report["rows"].items():
        summary = _summary(out / f"holdout-{category}")
        assert summary["holdout"] == category and summary["detector"] == "hybrid"
        assert row["rows"] == summary["per_attack_cat"][category]["rows"] > 0
        assert set(row["rates"]) == {"hybrid", "classifier+disagreement", "classifier", "autoencoder"}
        assert row["rates"]["hybrid"]["detected"] == summary["per_attack_cat"][category]["detection_rate"]
        assert row["rates"]["hybrid"]["false_alarms"] == summary["test"]["false_alarm_rate"]
        assert (
            row["rates"]["classifier"]["detected"]
            == summary["parts"]["classifier"]["per_attack_cat"][category]["detection_rate"]
        )
    assert "| DoS |" in (out / "novel.md").read_text()
    assert (out / "plots" / "novel.png").stat().st_size > 1000


def test_held_out_category_is_absent_from_train_and_validation(tmp_path):
    from anomaly.train import build_data, parse_args

    write_partition(make_partition(1500, seed=4), tmp_path / TRAIN_FILE)
    cfg = parse_args(
        ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run"), *ANOMALY_SMALL, "--holdout", "DoS"]
    )
    built = build_data(cfg, SINGLE)
    assert "DoS" not in set(built.splits.train["attack_cat"]) | set(built.splits.val["attack_cat"])
    assert (built.splits.test["attack_cat"] == "DoS").sum() > 10
    assert len(built.x["train"]) == len(built.splits.train)
    with pytest.raises(UserError, match="--holdout 'Nope': not an attack category"):
        build_data(
            parse_args(
                ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "r"), *ANOMALY_SMALL, "--holdout", "Nope"]
            ),
            SINGLE,
        )


def test_best_f1_threshold_counts_rows_that_are_always_flagged():
    from anomaly.metrics import best_f1_threshold

    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    labels = np.array([1, 1, 0, 0, 1, 0])
    assert best_f1_threshold(scores, labels) == (0.8, pytest.approx(0.8))  # tp 2, fn 1
    # Row 1 (an attack) always flagged: 0.9 now finds the same two attacks, and ties go to the
    # highest threshold.
    always = np.array([0, 1, 0, 0, 0, 0], dtype=bool)
    assert best_f1_threshold(scores, labels, always) == (0.9, pytest.approx(0.8))
    # A normal row always flagged is a false alarm at every threshold.
    always = np.array([0, 0, 0, 0, 0, 1], dtype=bool)
    assert best_f1_threshold(scores, labels, always) == (0.8, pytest.approx(4 / 6))


def test_novelty_parts_flag_their_share_of_the_budget_and_the_probability_is_tuned_given_them():
    """In the hybrid the classifier members' disagreement and the autoencoder each flag half of
    --novelty-alarms of the normal validation rows (one watcher alone: all of it); the
    probability's threshold is the best F1 given those alarms. One member (no disagreement)
    flags nothing."""
    from anomaly.metrics import best_f1_threshold, calibrate

    rng = np.random.default_rng(0)
    n = 4000
    labels = (rng.random(n) < 0.5).astype(int)
    probability = np.clip(labels * 0.6 + rng.random(n) * 0.4, 0, 1)
    disagreement, errors = rng.exponential(size=n), rng.exponential(size=n)
    normal = labels == 0

    def share(column, threshold):
        return (column[normal] >= threshold).mean()

    raw = np.stack([probability, disagreement, errors], axis=1)
    thresholds, f1 = calibrate(PARTS["hybrid"], raw, labels, novelty_alarms=0.05)
    assert list(thresholds) == ["classifier", "disagreement", "autoencoder"]
    for column, part in ((disagreement, "disagreement"), (errors, "autoencoder")):
        assert 0.025 <= share(column, thresholds[part]) < 0.025 + 2 / normal.sum(), part
    alarms = (disagreement >= thresholds["disagreement"]) | (errors >= thresholds["autoencoder"])
    assert (thresholds["classifier"], f1) == best_f1_threshold(probability, labels, alarms)

    with_disagreement = ("classifier", "disagreement")
    thresholds, f1 = calibrate(with_disagreement, raw[:, :2], labels, novelty_alarms=0.05)
    assert list(thresholds) == ["classifier", "disagreement"]
    assert 0.05 <= share(disagreement, thresholds["disagreement"]) < 0.05 + 2 / normal.sum()
    alarms = disagreement >= thresholds["disagreement"]
    assert (thresholds["classifier"], f1) == best_f1_threshold(probability, labels, alarms)

    one_member = np.stack([probability, np.zeros(n)], axis=1)
    thresholds, f1 = calibrate(with_disagreement, one_member, labels, novelty_alarms=0.05)
    assert thresholds["disagreement"] == 0.0
    assert (thresholds["classifier"], f1) == best_f1_threshold(probability, labels)
    flagged = combined_score(torch.from_numpy(one_member), thresholds_tensor(with_disagreement, thresholds)) >= 1
    assert torch.equal(flagged, torch.from_numpy(probability >= thresholds["classifier"]))


def test_classifier_members_each_learn_their_own_loss_and_the_probability_is_their_mean():
    """The classifier is common.tabular's network with k members: each member's BCE counts
    alone (a gradient that reaches one member's head leaves the others'), and a row's attack
    probability is the mean of the members' sigmoids, whatever batch it is scored in."""
    from anomaly.model import Classifier, training_loss

    torch.manual_seed(0)
    x = torch.randn(64, 6)
    net = Classifier(torch.tensor([0, 2, 3, 5]), (16, 16), 0.0, embed_bins=4, ensemble=3, train_x=x).double()
    logits = net(x.double())
    assert logits.shape == (64, 3) and (logits.std(dim=1) > 0).all()
    expected = torch.sigmoid(logits).mean(dim=1)
    assert torch.equal(net.probability(x.double()), expected)
    probability, disagreement = net.probability_and_disagreement(x.double())
    assert torch.equal(probability, expected)
    members = torch.sigmoid(logits)
    torch.testing.assert_close(
        disagreement, ((members - expected[:, None]) ** 2).mean(dim=1).sqrt(), rtol=0, atol=1e-12
    )
    parts = torch.cat([net.probability(x[i : i + 5].double()) for i in range(0, 64, 5)])
    torch.testing.assert_close(parts, expected, rtol=0, atol=1e-12)
    y = (x[:, 0] > 0).long()
    loss = training_loss("classifier", logits, x.double(), y, 1.0)
    per_member = [torch.nn.functional.binary_cross_entropy_with_logits(logits[:, m], y.double()) for m in range(3)]
    torch.testing.assert_close(loss, torch.stack(per_member).mean())
    # The dropped columns are not read: changing them changes nothing.
    changed = x.clone()
    changed[:, [1, 4]] = 99.0
    assert torch.equal(net(changed.double()), logits)
    with pytest.raises(UserError, match="share one width"):
        Classifier(torch.arange(6), (16, 8))


@SHARES_TRAINED
def test_predict_refuses_a_detector_without_the_classifier_options(trained, tmp_path):
    """A detector.pt of the version before the classifier had an embedding and members lacks
    its options: refused with one line that says to train again, not a shape error."""
    from anomaly.predict import load_detector

    _, run = trained
    bundle = torch.load(run / "detector.pt", weights_only=True)
    del bundle["classifier_options"]
    old = tmp_path / "old.pt"
    torch.save(bundle, old)
    with pytest.raises(UserError, match="lacks classifier_options.*train again"):
        load_detector(old)


@SHARES_TRAINED
def test_predict_refuses_a_detector_whose_thresholds_lack_a_part(trained, tmp_path):
    """A hybrid detector.pt of the version before the members' disagreement had thresholds for
    the classifier and the autoencoder only: refused with one line, not a KeyError."""
    from anomaly.predict import load_detector

    _, run = trained
    bundle = torch.load(run / "detector.pt", weights_only=True)
    del bundle["thresholds"]["disagreement"]
    old = tmp_path / "old.pt"
    torch.save(bundle, old)
    with pytest.raises(
        UserError,
        match="thresholds for classifier, autoencoder, where a hybrid "
        "detector of this version has classifier, disagreement, "
        "autoencoder.*train again",
    ):
        load_detector(old)
