"""Compare the trained detectors with classic ones on the same split and the same features.

Rows of the table (threshold on the validation split by best F1 unless said otherwise):
- all-attack baseline: flags everything; its F1 is what "no skill" scores on this test split;
- PCA reconstruction error: PCA on normal training rows, the number of components picked on
  validation from a small grid;
- IsolationForest, fitted on normal training rows;
- one-class SVM (RBF kernel), fitted on a seeded subsample of normal training rows (kernel SVMs
  scale quadratically with rows);
- gradient boosting (``HistGradientBoostingClassifier``), fitted on *labelled* training rows
  with the classifier's own input columns, tuned on validation over a small grid (the settings
  chosen are in the table): what the supervised network has to beat;
- every train.py run named by ``--runs`` (autoencoder, classifier, hybrid), read from its
  summary.json. The first run's config sets the split and feature settings here, and every run
  must share them, so every row is measured on the same rows.

Runs of several seeds (``--seed`` of train.py, which seeds the split too) give one table per
seed, every method measured on that seed's split, then each method's test F1 over the seeds:
per seed, mean and spread. That is the table to read before calling a winner.

Writes ``compare.md`` and ``compare.json`` into --out-dir.
Example: ``python anomaly/compare.py --data-dir ../shared/data --runs runs/anomaly-ae runs/anomaly runs/anomaly-hybrid``
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier, IsolationForest
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score
from sklearn.svm import OneClassSVM

from anomaly.data import hold_out, split_data
from anomaly.features import make_features
from anomaly.metrics import best_f1_threshold
from anomaly.model import classifier_inputs
from common.errors import UserError, run_main
from common.files import write_text_atomic
from common.records import write_json_atomic

SPLIT_KEYS = ("seed", "split", "val_fraction", "test_fraction", "pca_variance", "min_frequency", "max_rows", "holdout")
DEFAULTS = {
    "seed": 0,
    "split": "grouped",
    "val_fraction": 0.15,
    "test_fraction": 0.30,
    "pca_variance": 0.999,
    "min_frequency": 20,
    "max_rows": None,
    "holdout": None,
}
# Gradient boosting's grid, searched on validation F1 (max_iter with early stopping on a
# validation cut of the training rows, scikit-learn's default 10%).
GB_GRID = [{"learning_rate": lr, "max_leaf_nodes": leaves} for lr in (0.05, 0.1) for leaves in (31, 63, 127)]
OCSVM_ROWS = 5000  # normal training rows the one-class SVM is fitted on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="UNSW-NB15 folder")
    parser.add_argument(
        "--out-dir", type=Path, default=Path("runs/anomaly-compare"), help="where compare.md and compare.json go"
    )
    parser.add_argument(
        "--runs",
        type=Path,
        nargs="*",
        default=[Path("runs/anomaly")],
        help="train.py run directories whose summary.json gives a row each; the "
        "first sets the split and feature settings (none: defaults); runs "
        "of several seeds: a table per seed and F1 mean and spread over them",
    )
    parser.add_argument("--seed", type=int, default=None, help="split seed when there is no --runs summary (default 0)")
    parser.add_argument(
        "--max-rows", type=int, default=None, help="stratified subset per file when there is no --runs summary"
    )
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> list[tuple[dict[str, Any], list[tuple[Path, dict]]]]:
    """One (split/feature settings, runs) group per seed, in the order the seeds first appear.

    The settings come from the first run when there is one; runs of other seeds form groups of
    their own (each measured on its own split), and every other setting must be shared."""
    runs = []
    for run in args.runs:
        path = run / "summary.json"
        if not path.is_file():
            raise UserError(f"--runs {run}: no summary.json there; expected an anomaly/train.py run directory")
        runs.append((run, json.loads(path.read_text())))
    chosen = dict(DEFAULTS)
    if not runs:
        chosen.update({k: getattr(args, k) for k in ("seed", "max_rows") if getattr(args, k) is not None})
        return [(chosen, [])]
    first = runs[0][1]["config"]
    chosen.update({k: first.get(k, DEFAULTS[k]) for k in SPLIT_KEYS})
    groups: dict[int, list[tuple[Path, dict]]] = {}
    for run, summary in runs:
        differs = [k for k in SPLIT_KEYS if k != "seed" and summary["config"].get(k, DEFAULTS[k]) != chosen[k]]
        if differs:
            raise UserError(
                f"--runs {run}: its {', '.join(differs)} differ from {runs[0][0]}; "
                "compare runs of the same split and features"
            )
        groups.setdefault(summary["config"].get("seed", DEFAULTS["seed"]), []).append((run, summary))
    for flag in ("seed", "max_rows"):
        given = getattr(args, flag)
        if given is not None and given != chosen[flag]:
            raise UserError(
                f"--{flag.replace('_', '-')} {given} differs from the run "
                f"{runs[0][0]} ({chosen[flag]}); drop it so both use the same split"
            )
    return [({**chosen, "seed": seed}, group) for seed, group in groups.items()]


def metrics(y: np.ndarray, scores: np.ndarray, predicted: np.ndarray, unseen: np.ndarray) -> dict[str, float]:
    both = 0 < y.sum() < len(y)
    return {
        "precision": float(precision_score(y, predicted, zero_division=0)),
        "recall": float(recall_score(y, predicted, zero_division=0)),
        "f1": float(f1_score(y, predicted, zero_division=0)),
        "roc_auc": float(roc_auc_score(y, scores)) if both else float("nan"),
        "pr_auc": float(average_precision_score(y, scores)) if both else float("nan"),
        "f1_unseen": float(f1_score(y[unseen], predicted[unseen], zero_division=0)),
    }


def run_detector(
    name: str,
    kind: str,
    fit: Callable[[], Callable[[np.ndarray], np.ndarray]],
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    unseen: np.ndarray,
) -> dict[str, Any]:
    """Fit (timed), pick the threshold on validation, measure on test."""
    start = time.time()
    score = fit()
    fit_time = time.time() - start
    threshold, _ = best_f1_threshold(score(x_val), y_val)
    test_scores = score(x_test)
    row = {
        "method": name,
        "kind": kind,
        **metrics(y_test, test_scores, test_scores >= threshold, unseen),
        "fit_time_s": fit_time,
        "threshold": float(threshold),
    }
    return row


def tune_boosting(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, seed: int
) -> dict[str, Any]:
    """``GB_GRID``'s best setting by validation F1 (at its own best threshold), refitted never:
    the returned ``model`` is the one measured on validation."""
    best = None
    for params in GB_GRID:
        start = time.time()
        model = HistGradientBoostingClassifier(max_iter=1000, early_stopping=True, random_state=seed, **params).fit(
            x_train, y_train
        )
        seconds = time.time() - start
        f1 = best_f1_threshold(model.predict_proba(x_val)[:, 1], y_val)[1]
        if best is None or f1 > best[0]:
            best = (f1, params, model, seconds)
    return {**best[1], "trees": int(best[2].n_iter_), "model": best[2], "fit_s": best[3]}


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


def compare_one(args: argparse.Namespace, chosen: dict[str, Any], runs: list[tuple[Path, dict]]) -> dict:
    """Every method of the module docstring on the split ``chosen`` describes: the report."""
    splits = split_data(
        args.data_dir,
        chosen["val_fraction"],
        chosen["test_fraction"],
        chosen["seed"],
        chosen["max_rows"],
        chosen["split"],
    )
    if chosen["holdout"] is not None:
        splits = hold_out(splits, chosen["holdout"])
    transform, x, y = make_features(splits, chosen["min_frequency"], chosen["pca_variance"])
    x_normal, x_val, x_test = (x[k].numpy() for k in ("train_normal", "val", "test"))
    y_train, y_val, y_test = (y[k].numpy() for k in ("train", "val", "test"))
    columns = classifier_inputs(transform)  # the supervised network's own inputs
    unseen = ~splits.test_seen_in_train
    common = (x_val, y_val, x_test, y_test, unseen)
    rows = [
        {
            "method": "all-attack baseline",
            "kind": "trivial",
            **metrics(y_test, np.ones(len(y_test)), np.ones(len(y_test), dtype=bool), unseen),
            "fit_time_s": 0.0,
            "threshold": None,
        }
    ]

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

    rows.append(
        run_detector(
            f"one-class SVM (RBF, {min(OCSVM_ROWS, len(x_normal))} rows)", "semi-supervised", fit_ocsvm, *common
        )
    )

    gb = {}

    def fit_boosting():
        gb.update(tune_boosting(x["train"].numpy()[:, columns], y_train, x_val[:, columns], y_val, chosen["seed"]))
        model = gb.pop("model")
        return lambda features: model.predict_proba(features[:, columns])[:, 1]

    rows.append(run_detector("gradient boosting, tuned", "supervised", fit_boosting, *common))
    # The time column is the chosen setting's own fit; the whole grid search is kept beside it.
    rows[-1]["tuning_time_s"], rows[-1]["fit_time_s"] = rows[-1]["fit_time_s"], gb.pop("fit_s")
    rows[-1]["method"] += f" ({', '.join(f'{k} {v}' for k, v in gb.items())}; best of {len(GB_GRID)} on validation)"
    for run, summary in runs:
        test, unseen_part = summary["test"], summary["test_unseen"]
        detector = summary.get("detector", "autoencoder")
        kind = {"autoencoder": "semi-supervised", "classifier": "supervised"}.get(detector, "both")
        rows.append(
            {
                "method": f"{detector} network ({run}, world size {summary['world_size']})",
                "kind": kind,
                **{k: test[k] for k in ("precision", "recall", "f1", "roc_auc", "pr_auc")},
                "f1_unseen": unseen_part["f1"],
                "fit_time_s": summary["train_time_s"],
                "threshold": summary["thresholds"],
            }
        )

    return {
        "settings": chosen,
        "data": splits.source,
        "test_rows": len(y_test),
        "test_attack_share": float(y_test.mean()),
        "test_unseen_rows": int(unseen.sum()),
        "rows": rows,
    }


def main() -> None:
    args = parse_args()
    reports = [compare_one(args, chosen, runs) for chosen, runs in settings(args)]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if len(reports) == 1:
        report, table = reports[0], markdown(reports[0])
    else:  # several seeds: each one's table, then every method's F1 over the seeds
        report = {"seeds": reports, "summary": over_seeds(reports)}
        table = "\n".join(
            [*(f"## Seed {r['settings']['seed']}\n\n{markdown(r)}" for r in reports), seeds_markdown(report["summary"])]
        )
    write_json_atomic(args.out_dir / "compare.json", report)
    write_text_atomic(args.out_dir / "compare.md", table)
    print(table)


def over_seeds(reports: list[dict]) -> list[dict[str, Any]]:
    """Test F1 per seed, mean and spread (max - min) of each method every seed has. A method is
    its name without what varies by seed (the settings chosen, the run's folder); a second run
    of one detector in a seed is a method of its own ("classifier network #2")."""
    per_method: dict[str, list[float]] = {}
    for report in reports:
        seen: dict[str, int] = {}
        for row in report["rows"]:
            name = row["method"].split(" (")[0]
            seen[name] = seen.get(name, 0) + 1
            per_method.setdefault(name + (f" #{seen[name]}" if seen[name] > 1 else ""), []).append(row["f1"])
    return [
        {"method": name, "f1": values, "mean": float(np.mean(values)), "spread": float(max(values) - min(values))}
        for name, values in per_method.items()
        if len(values) == len(reports)
    ]


def seeds_markdown(summary: list[dict[str, Any]]) -> str:
    n = len(summary[0]["f1"]) if summary else 0
    lines = [
        f"## Test F1 over {n} seeds (each seed its own split)",
        "",
        "| method | F1 per seed | mean | spread (max - min) |",
        "| --- | --- | ---: | ---: |",
    ]
    for r in sorted(summary, key=lambda r: -r["mean"]):
        lines.append(
            f"| {r['method']} | {', '.join(f'{v:.4f}' for v in r['f1'])} | {r['mean']:.5f} | {r['spread']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Test split: {report['test_rows']:,} rows, {report['test_attack_share']:.1%} attacks "
        f"({report['data']}); F1 unseen = on the {report['test_unseen_rows']:,} test rows with "
        "no identical row in train. Thresholds chosen on validation.",
        "",
        "| method | kind | precision | recall | F1 | ROC-AUC | PR-AUC | F1 unseen | fit time (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['method']} | {r['kind']} | {r['precision']:.4f} | {r['recall']:.4f} | "
            f"{r['f1']:.4f} | {r['roc_auc']:.4f} | {r['pr_auc']:.4f} | {r['f1_unseen']:.4f} | "
            f"{r['fit_time_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
