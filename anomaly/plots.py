"""Pictures of a detector run (rank 0 only): what the numbers in summary.json look like."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve

from common.figures import plot_curves, pyplot, save_figure

plt = pyplot()  # this module only draws: Agg backend, loaded when it is imported


def score_histogram(scores: np.ndarray, labels: np.ndarray, threshold: float, path: Path, title: str) -> None:
    """Normal vs attack score distributions (log x) with the threshold."""
    fig, ax = plt.subplots(figsize=(7, 4))
    positive = scores[scores > 0]
    low = positive.min() if len(positive) else 1e-6
    bins = np.logspace(np.log10(low), np.log10(max(scores.max(), low * 10)), 80)
    ax.hist(np.maximum(scores[labels == 0], low), bins=bins, alpha=0.6, label="normal", color="tab:blue")
    ax.hist(np.maximum(scores[labels == 1], low), bins=bins, alpha=0.6, label="attack", color="tab:red")
    ax.axvline(threshold, color="black", linestyle="--", label="threshold")
    ax.set_xscale("log")
    ax.set_xlabel("score / threshold (at or above 1 = flagged)")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)


def pr_curve(scores: np.ndarray, labels: np.ndarray, test: dict[str, Any], path: Path, detector: str) -> None:
    precision, recall, _ = precision_recall_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot(recall, precision, label=f"{detector} (PR-AUC {test['pr_auc']:.3f})")
    ax.scatter(
        [test["recall"]],
        [test["precision"]],
        color="black",
        zorder=3,
        label=f"validation threshold (F1 {test['f1']:.3f})",
    )
    ax.axhline(labels.mean(), color="grey", linestyle=":", label="all-attack baseline")
    ax.set_xlabel("recall (attacks found)")
    ax.set_ylabel("precision")
    ax.set_title("test precision-recall")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    save_figure(fig, path)


def confusion(test: dict[str, Any], path: Path) -> None:
    cm = np.array([[test["tn"], test["fp"]], [test["fn"], test["tp"]]])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(
                j, i, f"{cm[i, j]:,}", ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black"
            )
    ax.set_xticks([0, 1], ["normal", "attack"])
    ax.set_yticks([0, 1], ["normal", "attack"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion matrix")
    save_figure(fig, path)


def per_category(categories: dict[str, dict[str, float]], path: Path) -> None:
    names = sorted(categories, key=lambda n: categories[n]["detection_rate"])
    rates = [categories[n]["detection_rate"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = ["tab:blue" if n == "Normal" else "tab:red" for n in names]
    ax.barh(names, rates, color=colors)
    for i, n in enumerate(names):
        ax.text(rates[i], i, f" {rates[i]:.2f} of {categories[n]['rows']:,}", va="center", fontsize=8)
    ax.set_xlim(0, 1.25)
    ax.set_xlabel("share flagged as attack (for Normal: false-positive rate)")
    ax.set_title("test detection rate per attack_cat")
    save_figure(fig, path)


def timeline(
    scores: np.ndarray,
    labels: np.ndarray,
    times: np.ndarray,
    time_label: str,
    threshold: float,
    path: Path,
    has_time: bool,
) -> None:
    """Scores over time with the threshold (top) and detected vs true attacks per time bin
    (bottom). Without timestamps the x axis is record order and the title says so."""
    order = np.argsort(times, kind="stable")
    t, s, y = times[order], scores[order], labels[order]
    flagged = s >= threshold
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(11, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    floor = max(s[s > 0].min() if (s > 0).any() else 1e-6, 1e-6)
    ax.scatter(t[y == 0], np.maximum(s[y == 0], floor), s=2, alpha=0.4, color="tab:blue", label="normal")
    ax.scatter(t[y == 1], np.maximum(s[y == 1], floor), s=2, alpha=0.4, color="tab:red", label="attack (true)")
    ax.axhline(threshold, color="black", linestyle="--", label="threshold: above = flagged")
    ax.set_yscale("log")
    ax.set_ylabel("score / threshold")
    ax.legend(loc="upper right", markerscale=4)
    edges = np.linspace(0, len(t), 61).astype(int)  # 60 bins of equal row counts
    centres = t[np.minimum((edges[:-1] + edges[1:]) // 2, len(t) - 1)] if len(t) else t
    true_per_bin = np.add.reduceat(y, edges[:-1]) if len(t) else []
    detected_per_bin = np.add.reduceat(flagged & (y == 1), edges[:-1]) if len(t) else []
    alarms_per_bin = np.add.reduceat(flagged & (y == 0), edges[:-1]) if len(t) else []
    counts.plot(centres, true_per_bin, color="tab:red", label="true attacks")
    counts.plot(centres, detected_per_bin, color="black", label="detected attacks")
    counts.plot(centres, alarms_per_bin, color="tab:blue", label="false alarms")
    counts.set_ylabel("rows per bin")
    counts.set_xlabel(time_label)
    counts.legend(loc="upper right")
    what = (
        f"over {time_label}"
        if has_time
        else (f"in {time_label}\n(these files hold no timestamps: record order is not time)")
    )
    ax.set_title(
        f"test rows {what}: {int((flagged & (y == 1)).sum()):,} of {int(y.sum()):,} "
        f"attacks detected, {int((flagged & (y == 0)).sum()):,} false alarms"
    )
    save_figure(fig, path)


def training_plots(
    plots_dir: Path,
    rows: list[dict[str, Any]],
    val_scores: np.ndarray,
    val_labels: np.ndarray,
    test_scores: np.ndarray,
    splits,
    test: dict[str, Any],
    categories: dict[str, dict[str, float]],
    detector: str,
) -> None:
    """Every picture of a train run, into ``plots_dir``; scores are ``score / threshold``."""
    plots_dir = Path(plots_dir)
    test_labels = splits.test["label"].to_numpy()
    if rows:
        plot_curves(rows, {"loss": ["train_loss", "val_loss"]}, plots_dir / "loss.png", f"{detector} training")
    score_histogram(
        val_scores,
        val_labels,
        1.0,
        plots_dir / "scores_val.png",
        f"{detector}: validation scores (threshold chosen here)",
    )
    score_histogram(test_scores, test_labels, 1.0, plots_dir / "scores_test.png", f"{detector}: test scores")
    pr_curve(test_scores, test_labels, test, plots_dir / "pr_curve.png", detector)
    confusion(test, plots_dir / "confusion.png")
    per_category(categories, plots_dir / "per_attack_cat.png")
    if splits.time_column:
        times = pd.to_datetime(splits.test[splits.time_column], unit="s").to_numpy()
        label = f"{splits.time_column} (UTC)"
    elif "id" in splits.test.columns:
        times, label = splits.test["id"].to_numpy(), "record order (id)"
    else:
        times, label = np.arange(len(test_scores)), "record order"
    timeline(test_scores, test_labels, times, label, 1.0, plots_dir / "timeline.png", has_time=bool(splits.time_column))


def draw_plots(plots_dir, rows: list[dict], result: dict, data, cfg) -> None:
    """The training curves and score plots of a finished run (rank 0): ``result`` is
    ``anomaly/train.py``'s ``evaluate(final=True)``, ``data`` its Data."""
    training_plots(
        plots_dir,
        rows,
        result["val_scores"].numpy(),
        data.y["val"].numpy(),
        result["test_scores"].numpy(),
        data.splits,
        result["test"],
        result["per_attack_cat"],
        cfg.detector,
    )
