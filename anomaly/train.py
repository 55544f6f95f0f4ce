"""Train an autoencoder on normal UNSW-NB15 traffic with DDP; flag flows it cannot reconstruct.

Semi-supervised: the network only ever sees *normal* training rows. The anomaly score is its
reconstruction error; the threshold is the one that maximises F1 on the validation split (never
on test). Test precision, recall, F1 come from a confusion matrix summed over ranks; ROC-AUC and
PR-AUC from the per-sample scores gathered in original order, so every figure is the same at any
world size. Resuming a finished run's checkpoint (``--resume RUN_DIR`` with the same
``--epochs``) trains nothing and only evaluates: that is how 1, 2 and 3 processes are compared on
the same weights.

Outputs in --out-dir: metrics.jsonl, summary.json (test metrics on the whole test split and on
the part with no identical row in train), checkpoint.pt, detector.pt (model + fitted feature
transform + threshold, for ``anomaly.predict``), plots/.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from anomaly.data import Splits, split_data
from anomaly.features import FeatureTransform, transform_to_plain
from anomaly.model import Autoencoder
from common.checkpoint import resume_from, save_checkpoint, training_state
from common.cli import check_shared_args, make_parser
from common.data import TrainBatches, eval_batches, eval_shard
from common.dist import DistInfo, distributed
from common.errors import UserError, ensure_finite, run_main
from common.metrics import all_reduce_tensor, confusion_matrix, gather_tensors, reduce_sums
from common.parallel import local_copy, memory_per_rank, unwrap, wrap_model
from common.preempt import EpochProgress, Preemption, progress_from
from common.report import RunRecorder, get_logger, progress
from common.rng import seed_everything

EXAMPLE = "torchrun --nproc_per_node=2 anomaly/train.py --data-dir ../shared/data"
EVAL_BATCH = 4096  # rows per rank per scoring batch


@dataclass(frozen=True)
class Config:
    data_dir: Path
    out_dir: Path
    epochs: int
    batch_size: int  # global, rows of normal traffic per optimizer step
    lr: float  # peak of the one-cycle schedule
    weight_decay: float
    seed: int
    resume: str | None
    device: str
    strategy: str  # "ddp" or "fsdp" (common.parallel); 29k parameters need no sharding
    dist_timeout: float  # seconds
    hidden: tuple[int, ...]  # encoder widths; the last is the code size
    val_fraction: float  # of all rows (one file) or of the training file (two files)
    test_fraction: float  # of all rows when one file is split
    pca_variance: float  # fraction of variance the PCA components keep, (0, 1)
    min_frequency: int  # rows; rarer categorical levels are folded into one
    score: str  # "mse" or "normalized" (per-feature error / normal-validation error)
    max_rows: int | None  # stratified subset of each file, for quick runs


def parse_args(argv: list[str] | None = None) -> Config:
    parser = make_parser(
        f"{__doc__.splitlines()[0]}\n\nexample:\n  {EXAMPLE}\n  "
        "python anomaly/train.py --data-dir ../shared/data --epochs 5   # one process, quick",
        epochs=100, batch_size=240, lr=3e-3, data_dir="data", out_dir="runs/anomaly")
    group = parser.add_argument_group("anomaly")
    group.add_argument("--hidden", default="128,64,16", help="encoder widths, comma-separated")
    group.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    group.add_argument("--val-fraction", type=float, default=0.15, help="validation share")
    group.add_argument("--test-fraction", type=float, default=0.30,
                       help="test share when a single file is split")
    group.add_argument("--pca-variance", type=float, default=0.999,
                       help="explained variance the PCA components must reach")
    group.add_argument("--min-frequency", type=int, default=20,
                       help="categorical levels rarer than this (rows) are folded together")
    group.add_argument("--score", choices=["mse", "normalized"], default="mse",
                       help="mse = mean squared error over scaled features; normalized = each "
                            "feature's error divided by its mean on normal validation rows")
    group.add_argument("--max-rows", type=int, default=None,
                       help="use a stratified subset of this many rows per file (quick runs)")
    args = parser.parse_args(argv)
    check_shared_args(args)
    try:
        hidden = tuple(int(h) for h in args.hidden.split(","))
    except ValueError:
        raise UserError(f"--hidden {args.hidden!r}: expected comma-separated integers like 128,64,16") from None
    if not hidden or min(hidden) <= 0:
        raise UserError(f"--hidden {args.hidden!r}: widths must be positive integers")
    if not (0 < args.val_fraction < 1 and 0 < args.test_fraction < 1
            and args.val_fraction + args.test_fraction < 1):
        raise UserError("--val-fraction and --test-fraction must be in (0, 1) and sum to less than 1")
    if not 0 < args.pca_variance < 1:
        raise UserError(f"--pca-variance must be in (0, 1), got {args.pca_variance}")
    if args.min_frequency < 1:
        raise UserError(f"--min-frequency must be at least 1, got {args.min_frequency}")
    if args.max_rows is not None and args.max_rows < 100:
        raise UserError(f"--max-rows must be at least 100, got {args.max_rows}")
    if args.weight_decay < 0:
        raise UserError(f"--weight-decay must be non-negative, got {args.weight_decay}")
    return Config(args.data_dir, args.out_dir, args.epochs, args.batch_size, args.lr,
                  args.weight_decay, args.seed, args.resume, args.device, args.strategy, args.dist_timeout,
                  hidden, args.val_fraction, args.test_fraction, args.pca_variance,
                  args.min_frequency, args.score, args.max_rows)


@dataclass
class Data:
    splits: Splits
    transform: FeatureTransform
    x: dict[str, torch.Tensor]  # "train_normal", "val", "test": scaled features, float32
    y: dict[str, torch.Tensor]  # "val", "test": 1 = attack


def build_data(cfg: Config) -> Data:
    """Read, validate and split the files; fit the features on normal training rows only.

    Every rank does this identically (all steps are deterministic), so nothing is broadcast.
    """
    splits = split_data(cfg.data_dir, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.max_rows)
    normal_train = splits.train[splits.train["label"] == 0]
    transform = FeatureTransform(cfg.min_frequency, pca_variance=cfg.pca_variance)
    x = {"train_normal": torch.from_numpy(transform.fit_transform(normal_train)),
         "val": torch.from_numpy(transform.transform(splits.val)),
         "test": torch.from_numpy(transform.transform(splits.test))}
    y = {name: torch.tensor(getattr(splits, name)["label"].to_numpy()) for name in ("val", "test")}
    return Data(splits, transform, x, y)


def build_model(cfg: Config, transform: FeatureTransform) -> Autoencoder:
    mean, components = transform.pca_tensors()
    return Autoencoder(torch.from_numpy(mean), torch.from_numpy(components), cfg.hidden)


def train_one_epoch(model, batches: TrainBatches, optimizer, scheduler, partial: EpochProgress,
                    dist: DistInfo, preempt: Preemption | None = None) -> float | None:
    """One pass over the normal training rows from ``partial.step``; returns the mean loss per
    row (exact), or None when pre-empted (``partial`` then says where it stopped)."""
    model.train()
    epoch, sums = partial.epoch, partial.sums
    sums.setdefault("loss", 0.0)
    sums.setdefault("n", 0)
    for (xb,) in progress(batches.epoch(epoch, partial.step), dist, len(batches) - partial.step,
                          f"epoch {epoch}"):
        loss = torch.nn.functional.mse_loss(model(xb), xb)  # mean over this rank's rows
        optimizer.zero_grad(set_to_none=True)
        batches.global_mean(loss, partial.step).backward()  # ranks' shares of the last batch may differ
        optimizer.step()
        scheduler.step()
        ensure_finite(loss.item(), epoch * len(batches) + partial.step)
        sums["loss"] += loss.item() * len(xb)
        sums["n"] += len(xb)
        partial.step += 1
        if preempt is not None and preempt.stop_requested():  # every rank, after the same step
            return None
    totals = reduce_sums(sums, dist)
    return totals["loss"] / totals["n"]


def score_rows(model: Autoencoder, x: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Anomaly score of every row of ``x`` in original order, on every rank.

    Scored in float64 on each rank's shard and gathered, so the scores (and all metrics derived
    from them) do not depend on how many ranks share the work.
    """
    net = local_copy(model).double().eval()  # plain: scores each shard alone
    parts = []
    with torch.no_grad():
        for (xb,) in eval_batches([x], EVAL_BATCH, dist):
            parts.append(net.score(xb.double()))
    local = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return gather_tensors(local, dist)


def normal_feature_error(model: Autoencoder, x: torch.Tensor, y: torch.Tensor,
                         dist: DistInfo) -> torch.Tensor:
    """Mean squared error per feature over the normal rows of ``x`` (exact sum over ranks)."""
    net = local_copy(model).double().eval()  # plain: scores each shard alone
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=dist.device)
    count = torch.zeros(1, dtype=torch.float64, device=dist.device)
    with torch.no_grad():
        for xb, yb in eval_batches([x, y], EVAL_BATCH, dist):
            normal = xb[yb == 0].double()
            total += net.feature_errors(normal).sum(dim=0)
            count += len(normal)
    total = all_reduce_tensor(total, dist)
    count = all_reduce_tensor(count, dist)
    return total / count.clamp(min=1)


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The score threshold (attack if score >= it) with the highest F1 on these rows."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))
    return float(thresholds[best]), float(f1[best])


def counts_to_metrics(cm: torch.Tensor) -> dict[str, float]:
    """Precision, recall, F1, accuracy from a 2x2 confusion matrix [true, predicted]."""
    tn, fp, fn, tp = (int(v) for v in cm.flatten())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "accuracy": (tp + tn) / max(tp + tn + fp + fn, 1), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def evaluate(scores: torch.Tensor, y: torch.Tensor, threshold: float, dist: DistInfo,
             mask: torch.Tensor | None = None) -> dict[str, float]:
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


def per_category(scores: torch.Tensor, categories: np.ndarray, threshold: float,
                 dist: DistInfo) -> dict[str, dict[str, float]]:
    """Detection rate (share flagged) per attack_cat, from counts summed over ranks."""
    names = sorted(set(categories))
    shard = eval_shard(len(scores), dist)
    codes = torch.from_numpy(np.searchsorted(names, categories[shard]))
    flagged = (scores[shard] >= threshold).long()
    counts = torch.stack([torch.bincount(codes, minlength=len(names)),
                          torch.bincount(codes, weights=flagged.double(), minlength=len(names)).long()])
    counts = all_reduce_tensor(counts, dist)
    return {name: {"rows": int(counts[0, i]), "flagged": int(counts[1, i]),
                   "detection_rate": float(counts[1, i] / max(int(counts[0, i]), 1))}
            for i, name in enumerate(names)}


def main() -> None:
    cfg = parse_args()
    with distributed(cfg.device, cfg.dist_timeout) as dist:
        log = get_logger("anomaly", dist)
        seed_everything(cfg.seed)
        start = time.time()
        data = build_data(cfg)  # validates every file before anything is written
        splits = data.splits
        log.info("data: %s; train %d (%d normal) / val %d / test %d rows (%d test rows have an "
                 "identical row in train); %d features -> %d PCA components",
                 splits.source, len(splits.train), len(data.x["train_normal"]), len(splits.val),
                 len(splits.test), int(splits.test_seen_in_train.sum()),
                 data.transform.n_features, data.transform.n_components)
        model = wrap_model(build_model(cfg, data.transform), dist, cfg.strategy)
        batches = TrainBatches([data.x["train_normal"]], cfg.batch_size, dist, cfg.seed)
        # foreach: see common/parallel.py (7 instead of 24 ms a step under FSDP on 2 CPUs).
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      foreach=True)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr,
                                                        total_steps=cfg.epochs * len(batches))
        meta = {"program": "anomaly", "arch": f"autoencoder-{'-'.join(map(str, cfg.hidden))}"}
        state = resume_from(cfg.resume, cfg.out_dir, dist, meta, model, optimizer, scheduler)
        start_epoch = state["epoch"] + 1 if state else 0
        if state and start_epoch > cfg.epochs:
            raise UserError(f"--resume: the checkpoint finished epoch {start_epoch}, more than "
                            f"--epochs {cfg.epochs}; pass --epochs {start_epoch} or more")
        recorder = RunRecorder(cfg.out_dir, dist, start_epoch)
        resumed, preempt = progress_from(state, dist), Preemption(dist)
        train_time = 0.0
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            partial = resumed if resumed is not None and resumed.epoch == epoch else EpochProgress(epoch)
            train_loss = train_one_epoch(model, batches, optimizer, scheduler, partial, dist, preempt)
            if train_loss is None:
                save_checkpoint(cfg.out_dir, training_state(
                    model, optimizer, epoch - 1, meta, scheduler,
                    transform=transform_to_plain(data.transform)), dist, partial)
                preempt.leave(cfg.out_dir / "checkpoint.pt", partial, log.info)
            train_time += time.time() - t0
            val_normal = normal_feature_error(model, data.x["val"], data.y["val"], dist).mean().item()
            recorder.log_epoch({"epoch": epoch, "train_loss": train_loss, "val_normal_loss": val_normal,
                                "lr": scheduler.get_last_lr()[0], "epoch_time_s": time.time() - t0})
            log.info("epoch %d/%d  train loss %.5f  val normal loss %.5f  (%.1fs)",
                     epoch + 1, cfg.epochs, train_loss, val_normal, time.time() - t0)
            save_checkpoint(cfg.out_dir, training_state(model, optimizer, epoch, meta, scheduler,
                                                        transform=transform_to_plain(data.transform)), dist)

        # Calibrate on validation only: the per-feature weights and the threshold.
        if cfg.score == "normalized":
            error = normal_feature_error(model, data.x["val"], data.y["val"], dist)
            # A buffer: every rank holds it whole under either strategy.
            unwrap(model).error_weight.copy_((1.0 / error.clamp(min=1e-6)).float())
        val_scores = score_rows(model, data.x["val"], dist)
        threshold, val_f1 = best_f1_threshold(val_scores.numpy(), data.y["val"].numpy())
        test_scores = score_rows(model, data.x["test"], dist)
        unseen = torch.from_numpy(~splits.test_seen_in_train)
        test = evaluate(test_scores, data.y["test"], threshold, dist)
        test_unseen = evaluate(test_scores, data.y["test"], threshold, dist, unseen)
        categories = per_category(test_scores, splits.test["attack_cat"].to_numpy(), threshold, dist)
        log.info("threshold %.5g (best validation F1 %.4f)", threshold, val_f1)
        log.info("test: precision %.4f recall %.4f F1 %.4f ROC-AUC %.4f PR-AUC %.4f (%d rows)",
                 test["precision"], test["recall"], test["f1"], test["roc_auc"], test["pr_auc"], test["n"])
        log.info("test rows with no identical row in train: precision %.4f recall %.4f F1 %.4f (%d rows)",
                 test_unseen["precision"], test_unseen["recall"], test_unseen["f1"], test_unseen["n"])

        rows = recorder.read_metrics()
        trained_rows = len(data.x["train_normal"]) * (cfg.epochs - start_epoch)
        summary = {"test": test, "test_unseen": test_unseen, "per_attack_cat": categories,
                   "threshold": threshold, "val_f1": val_f1, "score": cfg.score,
                   "data": {"source": splits.source, "train_rows": len(splits.train),
                            "train_normal_rows": len(data.x["train_normal"]),
                            "val_rows": len(splits.val), "test_rows": len(splits.test),
                            "test_seen_in_train": int(splits.test_seen_in_train.sum())},
                   "features": data.transform.describe(),
                   "epochs_trained": cfg.epochs - start_epoch, "train_time_s": train_time,
                   "samples_per_s": trained_rows / train_time if train_time else None,
                   "memory_per_rank": memory_per_rank(model, optimizer),
                   "wall_time_s": time.time() - start}
        net = local_copy(model)  # every rank: a collective under FSDP
        if dist.is_main:
            from anomaly import plots  # matplotlib loads only on the rank that draws, at the end

            write_detector(cfg.out_dir / "detector.pt", net, cfg, data.transform, threshold)
            plots.training_plots(recorder.plots_dir, rows, val_scores.numpy(), data.y["val"].numpy(),
                                 test_scores.numpy(), splits, threshold, test, categories)
        recorder.write_summary(summary, cfg)
        log.info("wrote %s (%.1fs)", cfg.out_dir, time.time() - start)


def write_detector(path: Path, net: Autoencoder, cfg: Config, transform: FeatureTransform,
                   threshold: float) -> None:
    """Everything ``anomaly.predict`` needs to score a new CSV, written atomically.

    Tensors and plain values only (the transform through ``transform_to_plain``), so
    ``anomaly.predict`` loads it without running code from the file.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"model": net.state_dict(), "hidden": list(cfg.hidden),
                "transform": transform_to_plain(transform),
                "threshold": threshold, "score": cfg.score}, tmp)
    tmp.replace(path)


if __name__ == "__main__":
    run_main(main)
