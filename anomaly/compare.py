"""Compare the autoencoder with classic detectors on the same splits and the same features.

Rows of the table (threshold on the validation split by best F1 unless said otherwise):
- all-attack baseline: flags everything; its F1 is what "no skill" scores on this test split;
- PCA reconstruction error: PCA on normal training rows, the number of components picked on
  validation from a small grid;
- IsolationForest, fitted on normal training rows;
- one-class SVM (RBF kernel), fitted on a seeded subsample of normal training rows (kernel SVMs
  scale quadratically with rows);
- supervised gradient boosting, fitted on *labelled* training rows: an upper bound for what the
  semi-supervised detectors could reach, not a competitor;
- the autoencoder, read from a train run's summary.json (``--ae-run``), whose config also sets
  the split and feature settings here, so every row is measured on the same rows.

Writes ``compare.md`` and ``compare.json`` into --out-dir.
Example: ``python anomaly/compare.py --data-dir ../shared/data --ae-run runs/anomaly``
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier, IsolationForest
from sklearn.metrics import (average_precision_score, f1_score, precision_score, recall_score,
                             roc_auc_score)
from sklearn.svm import OneClassSVM

from anomaly.data import split_data
from anomaly.features import FeatureTransform
from anomaly.train import best_f1_threshold
from common.errors import UserError, run_main
from common.report import write_json_atomic

SPLIT_KEYS = ("seed", "val_fraction", "test_fraction", "pca_variance", "min_frequency", "max_rows")
DEFAULTS = {"seed": 0, "val_fraction": 0.15, "test_fraction": 0.30, "pca_variance": 0.999,
            "min_frequency": 20, "max_rows": None}
OCSVM_ROWS = 5000  # normal training rows the one-class SVM is fitted on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="UNSW-NB15 folder")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/anomaly-compare"),
                        help="where compare.md and compare.json go")
    parser.add_argument("--ae-run", type=Path, default=Path("runs/anomaly"),
                        help="train.py run directory whose summary.json gives the autoencoder "
                             "row and the split/feature settings; skipped if it has none")
    parser.add_argument("--seed", type=int, default=None,
                        help="split seed when there is no --ae-run summary (default 0)")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="stratified subset per file when there is no --ae-run summary")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Split/feature settings (from the autoencoder run when there is one) and its summary."""
    path = args.ae_run / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else None
    chosen = dict(DEFAULTS)
    if summary is not None:
        chosen.update({k: summary["config"][k] for k in SPLIT_KEYS if k in summary["config"]})
        for flag in ("seed", "max_rows"):
            given = getattr(args, flag)
            if given is not None and given != chosen[flag]:
                raise UserError(f"--{flag.replace('_', '-')} {given} differs from the autoencoder run "
                                f"{args.ae_run} ({chosen[flag]}); drop it so both use the same split")
    else:
        chosen.update({k: getattr(args, k) for k in ("seed", "max_rows") if getattr(args, k) is not None})
    return chosen, summary


def metrics(y: np.ndarray, scores: np.ndarray, predicted: np.ndarray, unseen: np.ndarray) -> dict[str, float]:
    both = 0 < y.sum() < len(y)
    return {"precision": float(precision_score(y, predicted, zero_division=0)),
            "recall": float(recall_score(y, predicted, zero_division=0)),
            "f1": float(f1_score(y, predicted, zero_division=0)),
            "roc_auc": float(roc_auc_score(y, scores)) if both else float("nan"),
            "pr_auc": float(average_precision_score(y, scores)) if both else float("nan"),
            "f1_unseen": float(f1_score(y[unseen], predicted[unseen], zero_division=0))}


def run_detector(name: str, kind: str, fit: Callable[[], Callable[[np.ndarray], np.ndarray]],
                 x_val: np.ndarray, y_val: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 unseen: np.ndarray) -> dict[str, Any]:
    """Fit (timed), pick the threshold on validation, measure on test."""
    start = time.time()
    score = fit()
    fit_time = time.time() - start
    threshold, _ = best_f1_threshold(score(x_val), y_val)
    test_scores = score(x_test)
    row = {"method": name, "kind": kind, **metrics(y_test, test_scores, test_scores >= threshold, unseen),
           "fit_time_s": fit_time, "threshold": float(threshold)}
    return row


def pca_detector(x_normal: np.ndarray, x_val: np.ndarray, y_val: np.ndarray):
    """PCA residual error; the component count is chosen by validation F1."""
    full = PCA(svd_solver="full").fit(x_normal)
    best = None
    for k in (2, 5, 10, 15, 20, 30):
        k = min(k, full.n_components_ - 1)
        components = full.components_[:k]

        def score(x, c=components):
            centred = x - full.mean_
            return ((centred - centred @ c.T @ c) ** 2).sum(axis=1)

        f1 = best_f1_threshold(score(x_val), y_val)[1]
        if best is None or f1 > best[0]:
            best = (f1, k, score)
    return best[2], best[1]


def main() -> None:
    args = parse_args()
    chosen, summary = settings(args)
    splits = split_data(args.data_dir, chosen["val_fraction"], chosen["test_fraction"],
                        chosen["seed"], chosen["max_rows"])
    normal = splits.train[splits.train["label"] == 0]
    transform = FeatureTransform(chosen["min_frequency"], pca_variance=chosen["pca_variance"])
    x_normal = transform.fit_transform(normal)
    x_train, x_val, x_test = (transform.transform(f) for f in (splits.train, splits.val, splits.test))
    y_train, y_val, y_test = (f["label"].to_numpy() for f in (splits.train, splits.val, splits.test))
    unseen = ~splits.test_seen_in_train
    common = (x_val, y_val, x_test, y_test, unseen)
    rows = [{"method": "all-attack baseline", "kind": "trivial",
             **metrics(y_test, np.ones(len(y_test)), np.ones(len(y_test), dtype=bool), unseen),
             "fit_time_s": 0.0, "threshold": None}]

    pca_info = {}

    def fit_pca():
        score, k = pca_detector(x_normal, x_val, y_val)
        pca_info["k"] = k
        return score

    rows.append(run_detector("PCA reconstruction", "semi-supervised", fit_pca, *common))
    rows[-1]["method"] += f" ({pca_info['k']} components)"

    def fit_iforest():
        model = IsolationForest(n_estimators=200, random_state=chosen["seed"]).fit(x_normal)
        return lambda x: -model.score_samples(x)

    rows.append(run_detector("IsolationForest", "semi-supervised", fit_iforest, *common))

    def fit_ocsvm():
        rng = np.random.default_rng(chosen["seed"])
        sample = x_normal[rng.choice(len(x_normal), min(OCSVM_ROWS, len(x_normal)), replace=False)]
        model = OneClassSVM(kernel="rbf", gamma="scale", nu=0.05).fit(sample)
        return lambda x: -model.score_samples(x)

    rows.append(run_detector(f"one-class SVM (RBF, {min(OCSVM_ROWS, len(x_normal))} rows)",
                             "semi-supervised", fit_ocsvm, *common))

    def fit_supervised():
        model = HistGradientBoostingClassifier(random_state=chosen["seed"]).fit(x_train, y_train)
        return lambda x: model.predict_proba(x)[:, 1]

    rows.append(run_detector("gradient boosting (labels)", "supervised upper bound",
                             fit_supervised, *common))
    if summary is not None:
        test, unseen_part = summary["test"], summary["test_unseen"]
        rows.append({"method": f"autoencoder ({args.ae_run}, world size {summary['world_size']})",
                     "kind": "semi-supervised", **{k: test[k] for k in ("precision", "recall", "f1", "roc_auc", "pr_auc")},
                     "f1_unseen": unseen_part["f1"], "fit_time_s": summary["train_time_s"],
                     "threshold": summary["threshold"]})

    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"settings": chosen, "data": splits.source, "test_rows": len(y_test),
              "test_attack_share": float(y_test.mean()), "test_unseen_rows": int(unseen.sum()),
              "rows": rows}
    write_json_atomic(args.out_dir / "compare.json", report)
    table = markdown(report)
    tmp = args.out_dir / ".compare.md.tmp"
    tmp.write_text(table)
    tmp.replace(args.out_dir / "compare.md")
    print(table)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Test split: {report['test_rows']:,} rows, {report['test_attack_share']:.1%} attacks "
             f"({report['data']}); F1 unseen = on the {report['test_unseen_rows']:,} test rows with "
             "no identical row in train. Thresholds chosen on validation.", "",
             "| method | kind | precision | recall | F1 | ROC-AUC | PR-AUC | F1 unseen | fit time (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        lines.append(f"| {r['method']} | {r['kind']} | {r['precision']:.4f} | {r['recall']:.4f} | "
                     f"{r['f1']:.4f} | {r['roc_auc']:.4f} | {r['pr_auc']:.4f} | {r['f1_unseen']:.4f} | "
                     f"{r['fit_time_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
