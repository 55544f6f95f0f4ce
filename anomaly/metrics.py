"""Thresholds chosen on validation, and detection metrics exact at any world size.

Counts (confusion matrices, detections per attack category) come from each rank's shard of the
gathered scores, summed over ranks; the AUCs from the gathered scores every rank holds.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from anomaly.model import NOVELTY_PARTS, PARTS, combined_score, thresholds_tensor
from common.data import eval_shard
from common.dist import DistInfo
from common.metrics import all_reduce_tensor, confusion_matrix


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray, always: np.ndarray | None = None) -> tuple[float, float]:
    """The threshold (attack if score >= it) with the highest F1 on these rows, and that F1.

    ``always``: rows flagged whatever the threshold (the hybrid's novelty alarms); the F1 counts
    them. Ties go to the highest threshold (fewest alarms).
    """
    labels = np.asarray(labels).astype(bool)
    always = np.zeros(len(labels), dtype=bool) if always is None else np.asarray(always, dtype=bool)
    base_tp, base_fp = int(labels[always].sum()), int((~labels[always]).sum())
    rest, rest_labels = np.asarray(scores)[~always], labels[~always]
    order = np.argsort(-rest, kind="stable")
    ordered, hits = rest[order], rest_labels[order]
    last_of_value = np.r_[ordered[1:] != ordered[:-1], True]  # flag every row >= this value
    tp = base_tp + np.cumsum(hits)[last_of_value]
    fp = base_fp + np.cumsum(~hits)[last_of_value]
    f1 = 2 * tp / np.maximum(2 * tp + fp + (labels.sum() - tp), 1)
    best = int(np.argmax(f1))
    return float(ordered[last_of_value][best]), float(f1[best])


def calibrate(
    parts: tuple[str, ...], raw: np.ndarray, labels: np.ndarray, novelty_alarms: float
) -> tuple[dict[str, float], float]:
    """Thresholds per part (``parts``, e.g. ``PARTS[detector]``: ``raw``'s columns), chosen on
    validation; and the validation F1 they give.

    One part: the threshold with the best F1. With a classifier: each novelty part's threshold
    (``NOVELTY_PARTS``) lets through an equal share of ``novelty_alarms`` of the normal rows
    (their job is what the classifier was never shown, which validation F1 cannot see); the
    classifier's threshold is then the best F1 given those alarms.
    """
    if len(parts) == 1:
        threshold, f1 = best_f1_threshold(raw[:, 0], labels)
        return {parts[0]: threshold}, f1
    novelty = [part for part in parts if part in NOVELTY_PARTS]
    share = novelty_alarms / len(novelty)
    thresholds, alarms = {}, np.zeros(len(labels), dtype=bool)
    for part in novelty:
        column = raw[:, parts.index(part)]
        thresholds[part] = float(np.quantile(column[labels == 0], 1 - share, method="higher"))
        # The rule combined_score applies, so a score that never varies (the disagreement of
        # a single member: always 0, threshold 0) flags no row.
        alarms |= (
            combined_score(
                torch.from_numpy(column[:, None]), torch.tensor([thresholds[part]], dtype=torch.float64)
            ).numpy()
            >= 1
        )
    thresholds["classifier"], f1 = best_f1_threshold(raw[:, parts.index("classifier")], labels, always=alarms)
    return {part: thresholds[part] for part in parts}, f1


def counts_to_metrics(cm: torch.Tensor) -> dict[str, float]:
    """Precision, recall, F1, accuracy from a 2x2 confusion matrix [true, predicted]."""
    tn, fp, fn, tp = (int(v) for v in cm.flatten())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": (tp + tn) / max(tp + tn + fp + fn, 1),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "false_alarm_rate": fp / (fp + tn) if fp + tn else 0.0,
    }


def metrics_at(
    scores: torch.Tensor, y: torch.Tensor, threshold: float, dist: DistInfo, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Metrics of ``score >= threshold`` on the rows (optionally those in ``mask``).

    Counts come from each rank's shard, summed over ranks (exact); the AUCs use the gathered
    scores, which every rank holds.
    """
    shard = eval_shard(len(y), dist)
    keep = torch.ones(len(y), dtype=torch.bool) if mask is None else mask
    local_pred = (scores[shard] >= threshold)[keep[shard]]
    cm = all_reduce_tensor(confusion_matrix(local_pred, y[shard][keep[shard]], 2), dist)
    out = counts_to_metrics(cm)
    labels, chosen = y[keep].numpy(), scores[keep].numpy()
    both = 0 < labels.sum() < len(labels)
    out["roc_auc"] = float(roc_auc_score(labels, chosen)) if both else float("nan")
    out["pr_auc"] = float(average_precision_score(labels, chosen)) if both else float("nan")
    out["n"] = int(keep.sum())
    return out


def per_category(
    scores: torch.Tensor, categories: np.ndarray, threshold: float, dist: DistInfo
) -> dict[str, dict[str, float]]:
    """Detection rate (share flagged) per attack_cat, from counts summed over ranks."""
    names = sorted(set(categories))
    shard = eval_shard(len(scores), dist)
    codes = torch.from_numpy(np.searchsorted(names, categories[shard]))
    flagged = (scores[shard] >= threshold).long()
    counts = torch.stack(
        [
            torch.bincount(codes, minlength=len(names)),
            torch.bincount(codes, weights=flagged.double(), minlength=len(names)).long(),
        ]
    )
    counts = all_reduce_tensor(counts, dist)
    return {
        name: {
            "rows": int(counts[0, i]),
            "flagged": int(counts[1, i]),
            "detection_rate": float(counts[1, i] / max(int(counts[0, i]), 1)),
        }
        for i, name in enumerate(names)
    }


def figures(result: dict) -> dict:
    """``evaluate``'s result without the per-row scores: what summary.json and eval.json hold."""
    return {k: v for k, v in result.items() if not k.endswith("_scores")}


def log_result(result: dict, cfg, log) -> None:
    """The thresholds and test figures, one line each (rank 0)."""
    test, unseen = result["test"], result["test_unseen"]
    log.info(
        "thresholds %s (validation F1 %.4f)",
        ", ".join(f"{k} {v:.5g}" for k, v in result["thresholds"].items()),
        result["val_f1"],
    )
    log.info(
        "test: precision %.4f recall %.4f F1 %.4f ROC-AUC %.4f PR-AUC %.4f, normal rows flagged %.4f (%d rows)",
        test["precision"],
        test["recall"],
        test["f1"],
        test["roc_auc"],
        test["pr_auc"],
        test["false_alarm_rate"],
        test["n"],
    )
    if cfg.split == "random":
        log.info(
            "test rows with no identical row in train: precision %.4f recall %.4f F1 %.4f (%d rows)",
            unseen["precision"],
            unseen["recall"],
            unseen["f1"],
            unseen["n"],
        )
    if cfg.holdout is not None:
        log.info("held-out %s: %.4f detected", cfg.holdout, result["per_attack_cat"][cfg.holdout]["detection_rate"])


# What the hybrid holds, each calibrated as a detector of those parts alone would be.
ALONE = {
    "classifier": ("classifier",),
    "classifier+disagreement": ("classifier", "disagreement"),
    "autoencoder": ("autoencoder",),
}


def part_metrics(
    detector: str, val_raw: torch.Tensor, test_raw: torch.Tensor, data, dist: DistInfo, novelty_alarms: float
) -> dict[str, dict]:
    """The hybrid's parts measured as detectors of their own (``ALONE``): the classifier, the
    classifier with its members' disagreement, and the autoencoder; each calibrated on
    validation as that detector would be (``calibrate``), so each novelty watcher's share is
    read off one run.

    The parts train on disjoint parameters with a summed loss (AdamW updates each parameter from
    its own gradient), so with the same epochs, batch and learning rate the classifier part is
    the classifier trained alone, and the autoencoder part never sees an attack row: one hybrid
    run measures every kind of detector (what ``anomaly.novel`` relies on).
    """
    if detector != "hybrid":
        return {}
    out = {}
    for name, parts in ALONE.items():
        columns = [PARTS[detector].index(part) for part in parts]
        thresholds, val_f1 = calibrate(parts, val_raw[:, columns].numpy(), data.y["val"].numpy(), novelty_alarms)
        scores = combined_score(test_raw[:, columns], thresholds_tensor(parts, thresholds))
        out[name] = {
            "thresholds": thresholds,
            "val_f1": val_f1,
            "test": metrics_at(scores, data.y["test"], 1.0, dist),
            "per_attack_cat": per_category(scores, data.splits.test["attack_cat"].to_numpy(), 1.0, dist),
        }
    return out
