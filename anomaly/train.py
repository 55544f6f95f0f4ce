"""Train a detector of attacks in UNSW-NB15 traffic with DDP (or FSDP) and measure it honestly.

``--detector`` picks what is trained (``anomaly/model.py``):
- ``classifier`` (default, best F1 on the honest split): supervised, every labelled training row;
- ``autoencoder``: semi-supervised, normal training rows only; its score is the reconstruction
  error, so it can flag attacks of a kind no label has shown;
- ``hybrid``: both, trained together; an attack if the classifier says so *or* the autoencoder
  finds the row unlike normal traffic (at most ``--novelty-alarms`` of normal validation rows).

Thresholds are chosen on the validation split (never on test). By default the split keeps every
group of identical feature rows on one side (``--split grouped``), so no test row has a copy in
train; ``--split random`` gives the usual random split for comparison with published figures.
Test precision, recall, F1 come from a confusion matrix summed over ranks; ROC-AUC and PR-AUC
from the per-sample scores gathered in original order, so every figure is the same at any world
size. Resuming a finished run's checkpoint (``--resume RUN_DIR`` with the same ``--epochs``)
trains nothing and only evaluates: that is how 1, 2 and 3 processes are compared on the same
weights.

Outputs in --out-dir: metrics.jsonl, summary.json, checkpoint.pt, detector.pt (network + fitted
feature transform + thresholds, for ``anomaly.predict``), plots/.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from anomaly.data import SPLITS, Splits, split_data
from anomaly.features import FeatureTransform, transform_to_plain
from anomaly.model import (PARTS, Autoencoder, combined_score, make_detector, raw_scores,
                           thresholds_tensor, training_loss)
from common.checkpoint import resume_from, save_checkpoint, training_state
from common.cli import check_shared_args, make_parser
from common.data import TrainBatches, eval_batches, eval_shard
from common.dist import DistInfo, agreed, distributed
from common.errors import UserError, ensure_finite, run_main
from common.files import torch_save_atomic
from common.metrics import all_reduce_tensor, confusion_matrix, gather_tensors, reduce_sums
from common.parallel import local_copy, memory_per_rank, unwrap, wrap_model
from common.preempt import EpochProgress, Preemption, progress_from
from common.report import RunRecorder, get_logger, progress
from common.rng import seed_everything

EXAMPLE = "torchrun --nproc_per_node=2 anomaly/train.py --data-dir ../shared/data"
EVAL_BATCH = 4096  # rows per rank per scoring batch
DETECTORS = tuple(PARTS)
# Per detector: (epochs, global batch, peak lr); --epochs, --batch-size, --lr override them.
# The autoencoder's epochs pass over the normal training rows only (about 45% of them).
DEFAULTS = {"autoencoder": (100, 240, 3e-3), "classifier": (30, 512, 3e-3), "hybrid": (30, 512, 3e-3)}


@dataclass(frozen=True)
class Config:
    data_dir: Path
    out_dir: Path
    epochs: int
    batch_size: int  # global rows per optimizer step (normal rows only for the autoencoder)
    lr: float  # peak of the one-cycle schedule
    weight_decay: float
    seed: int
    resume: str | None
    device: str
    strategy: str  # "ddp" or "fsdp" (common.parallel); these small models need no sharding
    dist_timeout: float  # seconds
    detector: str  # "autoencoder", "classifier" or "hybrid" (anomaly/model.py)
    split: str  # "grouped" (identical rows on one side) or "random"
    hidden: tuple[int, ...]  # autoencoder encoder widths; the last is the code size
    classifier_hidden: tuple[int, ...]  # classifier MLP widths
    novelty_alarms: float  # hybrid: share of normal validation rows the autoencoder may flag
    holdout: str | None  # attack_cat removed from train and validation (novel-attack study)
    val_fraction: float  # of all rows (one file) or of the training file (two files)
    test_fraction: float  # of all rows when one file is split
    pca_variance: float  # fraction of variance the PCA components keep, (0, 1)
    min_frequency: int  # rows; rarer categorical levels are folded into one
    score: str  # "mse" or "normalized" (per-feature error / normal-validation error)
    max_rows: int | None  # stratified subset of each file, for quick runs
    tensorboard: bool = False  # rank 0 also writes metrics.jsonl's scalars for TensorBoard


def _widths(flag: str, text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(h) for h in text.split(","))
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers like 128,64,16") from None
    if not widths or min(widths) <= 0:
        raise UserError(f"{flag} {text!r}: widths must be positive integers")
    return widths


def parse_args(argv: list[str] | None = None) -> Config:
    parser = make_parser(
        f"{__doc__.splitlines()[0]}\n\nexamples:\n  {EXAMPLE}\n  "
        f"{EXAMPLE} --detector hybrid\n  "
        "python anomaly/train.py --data-dir ../shared/data --epochs 5   # one process, quick\n\n"
        "--epochs, --batch-size and --lr default per detector: "
        + "; ".join(f"{d} {e} / {b} / {lr:g}" for d, (e, b, lr) in DEFAULTS.items()),
        epochs=0, batch_size=0, lr=0.0, data_dir="data", out_dir="runs/anomaly")
    parser.set_defaults(epochs=None, batch_size=None, lr=None)
    group = parser.add_argument_group("anomaly")
    group.add_argument("--detector", choices=DETECTORS, default="classifier",
                       help="classifier: supervised; autoencoder: normal traffic only; "
                            "hybrid: both, an attack if either flags it")
    group.add_argument("--split", choices=SPLITS, default="grouped",
                       help="grouped: identical feature rows stay on one side (no test row has a "
                            "copy in train); random: rows split independently")
    group.add_argument("--hidden", default="128,64,16", help="autoencoder encoder widths")
    group.add_argument("--classifier-hidden", default="256,256", help="classifier MLP widths")
    group.add_argument("--novelty-alarms", type=float, default=0.01,
                       help="hybrid: the autoencoder flags at most this share of normal "
                            "validation rows; the classifier's threshold is tuned given that")
    group.add_argument("--holdout", default=None, metavar="ATTACK_CAT",
                       help="remove this attack category from train and validation (test keeps "
                            "it): how well is a never-seen kind of attack caught?")
    group.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    group.add_argument("--val-fraction", type=float, default=0.15, help="validation share")
    group.add_argument("--test-fraction", type=float, default=0.30,
                       help="test share when a single file is split")
    group.add_argument("--pca-variance", type=float, default=0.999,
                       help="explained variance the PCA components must reach")
    group.add_argument("--min-frequency", type=int, default=20,
                       help="categorical levels rarer than this (rows) are folded together")
    group.add_argument("--score", choices=["mse", "normalized"], default="mse",
                       help="autoencoder score: mse = mean squared error over scaled features; "
                            "normalized = each feature's error / its mean on normal validation rows")
    group.add_argument("--max-rows", type=int, default=None,
                       help="use a stratified subset of this many rows per file (quick runs)")
    args = parser.parse_args(argv)
    epochs, batch_size, lr = DEFAULTS[args.detector]
    args.epochs = epochs if args.epochs is None else args.epochs
    args.batch_size = batch_size if args.batch_size is None else args.batch_size
    args.lr = lr if args.lr is None else args.lr
    check_shared_args(args)
    if not (0 < args.val_fraction < 1 and 0 < args.test_fraction < 1
            and args.val_fraction + args.test_fraction < 1):
        raise UserError("--val-fraction and --test-fraction must be in (0, 1) and sum to less than 1")
    if not 0 < args.pca_variance < 1:
        raise UserError(f"--pca-variance must be in (0, 1), got {args.pca_variance}")
    if not 0 < args.novelty_alarms < 1:
        raise UserError(f"--novelty-alarms must be in (0, 1), got {args.novelty_alarms}")
    if args.min_frequency < 1:
        raise UserError(f"--min-frequency must be at least 1, got {args.min_frequency}")
    if args.max_rows is not None and args.max_rows < 100:
        raise UserError(f"--max-rows must be at least 100, got {args.max_rows}")
    if args.weight_decay < 0:
        raise UserError(f"--weight-decay must be non-negative, got {args.weight_decay}")
    return Config(args.data_dir, args.out_dir, args.epochs, args.batch_size, args.lr,
                  args.weight_decay, args.seed, args.resume, args.device, args.strategy,
                  args.dist_timeout, args.detector, args.split, _widths("--hidden", args.hidden),
                  _widths("--classifier-hidden", args.classifier_hidden), args.novelty_alarms,
                  args.holdout, args.val_fraction, args.test_fraction, args.pca_variance,
                  args.min_frequency, args.score, args.max_rows, args.tensorboard)


@dataclass
class Data:
    splits: Splits
    transform: FeatureTransform
    x: dict[str, torch.Tensor]  # "train", "train_normal", "val", "test": scaled features, float32
    y: dict[str, torch.Tensor]  # same keys: 1 = attack

    @property
    def normal_share(self) -> float:
        """Share of normal rows among the training rows (scales the hybrid's autoencoder loss)."""
        return len(self.x["train_normal"]) / len(self.x["train"])

    def training_rows(self, detector: str) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``detector`` learns from: normal rows for the autoencoder, all rows otherwise."""
        key = "train_normal" if detector == "autoencoder" else "train"
        return self.x[key], self.y[key]


def build_data(cfg: Config, dist: DistInfo) -> Data:
    """Read, validate and split the files; fit the features on normal training rows only.

    Every rank does this identically (all steps are deterministic), so nothing is broadcast; a
    problem with the files on any rank stops every rank with one line (``agreed``).
    """
    return agreed(lambda: _build_data(cfg), dist)


def _build_data(cfg: Config) -> Data:
    splits = split_data(cfg.data_dir, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.max_rows,
                        cfg.split)
    if cfg.holdout is not None:
        splits = hold_out(splits, cfg.holdout)
    transform, x, y = make_features(splits, cfg.min_frequency, cfg.pca_variance)
    return Data(splits, transform, x, y)


def make_features(splits: Splits, min_frequency: int, pca_variance: float
                  ) -> tuple[FeatureTransform, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fit the transform on the normal training rows; features and labels of every split."""
    normal = (splits.train["label"] == 0).to_numpy()
    transform = FeatureTransform(min_frequency, pca_variance=pca_variance)
    x_normal = transform.fit_transform(splits.train[normal])  # frequencies leave-one-out
    x_train = transform.transform(splits.train)
    x_train[normal] = x_normal  # every training row's frequencies count the *other* rows only
    x = {"train": torch.from_numpy(x_train), "train_normal": torch.from_numpy(x_normal),
         "val": torch.from_numpy(transform.transform(splits.val)),
         "test": torch.from_numpy(transform.transform(splits.test))}
    y = {name: torch.tensor(getattr(splits, name)["label"].to_numpy()) for name in ("train", "val", "test")}
    y["train_normal"] = torch.zeros(len(x_normal), dtype=y["train"].dtype)
    return transform, x, y


def hold_out(splits: Splits, category: str) -> Splits:
    """``splits`` without ``category`` in train and validation; test keeps every row."""
    known = sorted(set(splits.test["attack_cat"]) - {"Normal"})
    if category not in known:
        raise UserError(f"--holdout {category!r}: not an attack category of this data; "
                        f"expected one of {', '.join(known)}")
    keep = {name: getattr(splits, name)[getattr(splits, name)["attack_cat"] != category]
            for name in ("train", "val")}
    return Splits(keep["train"], keep["val"], splits.test, splits.test_seen_in_train,
                  f"{splits.source}; {category} removed from train and validation", splits.time_column)


def build_model(cfg: Config, transform: FeatureTransform) -> torch.nn.Module:
    """The network ``cfg.detector`` names, with the fitted PCA and input columns as buffers."""
    return make_detector(cfg.detector, transform, cfg.hidden, cfg.classifier_hidden)


def build_optimizer(cfg: Config, model: torch.nn.Module, steps: int):
    """AdamW with a one-cycle schedule stepped per batch."""
    # foreach: see common/parallel.py (7 instead of 24 ms a step under FSDP on 2 CPUs).
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  foreach=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=steps)
    return optimizer, scheduler


def autoencoder_part(net: torch.nn.Module) -> Autoencoder | None:
    return net if isinstance(net, Autoencoder) else getattr(net, "autoencoder", None)


def train_one_epoch(model, batches: TrainBatches, optimizer, scheduler, partial: EpochProgress,
                    dist: DistInfo, detector: str, normal_share: float,
                    preempt: Preemption | None = None) -> dict[str, float] | None:
    """One pass over the training rows from ``partial.step``; returns ``{"train_loss"}``, the
    exact mean loss per row over all ranks, or None when pre-empted (``partial`` then says where
    it stopped)."""
    model.train()
    epoch, sums = partial.epoch, partial.sums
    sums.setdefault("loss", 0.0)
    sums.setdefault("n", 0)
    for xb, yb in progress(batches.epoch(epoch, partial.step), dist, len(batches) - partial.step,
                           f"epoch {epoch}"):
        loss = training_loss(detector, model(xb), xb, yb, normal_share)  # mean over this rank's rows
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
    return {"train_loss": totals["loss"] / totals["n"]}


def validation_loss(model, x: torch.Tensor, y: torch.Tensor, dist: DistInfo, detector: str,
                    normal_share: float) -> float:
    """The training loss on validation rows (normal ones only for the autoencoder), exact."""
    if detector == "autoencoder":
        x, y = x[y == 0], y[y == 0]
    net = local_copy(model).eval()  # plain: scores each shard alone
    sums = {"loss": 0.0, "n": 0}
    with torch.no_grad():
        for xb, yb in eval_batches([x, y], EVAL_BATCH, dist):
            sums["loss"] += training_loss(detector, net(xb), xb, yb, normal_share).item() * len(xb)
            sums["n"] += len(xb)
    totals = reduce_sums(sums, dist)
    return totals["loss"] / max(totals["n"], 1)


def score_rows(model, x: torch.Tensor, dist: DistInfo, detector: str) -> torch.Tensor:
    """Raw scores (rows, parts) of every row of ``x`` in original order, on every rank.

    Scored in float64 on each rank's shard and gathered, so the scores (and all metrics derived
    from them) do not depend on how many ranks share the work.
    """
    net = local_copy(model).double().eval()  # plain: scores each shard alone
    parts = []
    with torch.no_grad():
        for (xb,) in eval_batches([x], EVAL_BATCH, dist):
            parts.append(raw_scores(detector, net, xb.double()))
    local = torch.cat(parts) if parts else torch.zeros(0, len(PARTS[detector]), dtype=torch.float64)
    return gather_tensors(local, dist)


def normal_feature_error(model, x: torch.Tensor, y: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """The autoencoder's mean squared error per feature over the normal rows of ``x`` (exact)."""
    net = autoencoder_part(local_copy(model)).double().eval()  # plain: scores each shard alone
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


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray,
                      always: np.ndarray | None = None) -> tuple[float, float]:
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


def calibrate(detector: str, raw: np.ndarray, labels: np.ndarray,
              novelty_alarms: float) -> tuple[dict[str, float], float]:
    """Thresholds per part, chosen on validation; and the validation F1 they give.

    One part: the threshold with the best F1. Hybrid: the autoencoder's threshold lets through
    ``novelty_alarms`` of the normal rows (its job is what the classifier was never shown, which
    validation F1 cannot see); the classifier's threshold is then the best F1 given those alarms.
    """
    if detector != "hybrid":
        threshold, f1 = best_f1_threshold(raw[:, 0], labels)
        return {PARTS[detector][0]: threshold}, f1
    errors = raw[:, 1]
    novelty = float(np.quantile(errors[labels == 0], 1 - novelty_alarms, method="higher"))
    threshold, f1 = best_f1_threshold(raw[:, 0], labels, always=errors >= novelty)
    return {"classifier": threshold, "autoencoder": novelty}, f1


def counts_to_metrics(cm: torch.Tensor) -> dict[str, float]:
    """Precision, recall, F1, accuracy from a 2x2 confusion matrix [true, predicted]."""
    tn, fp, fn, tp = (int(v) for v in cm.flatten())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "accuracy": (tp + tn) / max(tp + tn + fp + fn, 1), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "false_alarm_rate": fp / (fp + tn) if fp + tn else 0.0}


def metrics_at(scores: torch.Tensor, y: torch.Tensor, threshold: float, dist: DistInfo,
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
        run(cfg, dist)


def run(cfg: Config, dist: DistInfo) -> dict:
    """Train (or resume) and evaluate one detector; returns the summary (``anomaly.novel`` calls
    this once per held-out category, in one process group)."""
    log = get_logger("anomaly", dist)
    seed_everything(cfg.seed)
    start = time.time()
    data = build_data(cfg, dist)  # every file validated before anything is written
    splits = data.splits
    log.info("data: %s; train %d (%d normal) / val %d / test %d rows (%d test rows have an "
             "identical row in train); %d features -> %d PCA components; detector %s",
             splits.source, len(splits.train), len(data.x["train_normal"]), len(splits.val),
             len(splits.test), int(splits.test_seen_in_train.sum()),
             data.transform.n_features, data.transform.n_components, cfg.detector)
    model = wrap_model(build_model(cfg, data.transform), dist, cfg.strategy)
    batches = TrainBatches(list(data.training_rows(cfg.detector)), cfg.batch_size, dist, cfg.seed)
    optimizer, scheduler = build_optimizer(cfg, model, cfg.epochs * len(batches))
    meta = {"program": "anomaly", "arch": f"{cfg.detector}-ae{'-'.join(map(str, cfg.hidden))}"
                                          f"-clf{'-'.join(map(str, cfg.classifier_hidden))}"}
    state = resume_from(cfg.resume, cfg.out_dir, dist, meta, model, optimizer, scheduler)
    start_epoch = state["epoch"] + 1 if state else 0
    if state and start_epoch > cfg.epochs:
        raise UserError(f"--resume: the checkpoint finished epoch {start_epoch}, more than "
                        f"--epochs {cfg.epochs}; pass --epochs {start_epoch} or more")
    recorder = RunRecorder(cfg.out_dir, dist, start_epoch, tensorboard=cfg.tensorboard)
    resumed, preempt = progress_from(state, dist), Preemption(dist)
    train_time = 0.0
    for epoch in range(start_epoch, cfg.epochs):  # a finished run resumed: evaluation only
        t0 = time.time()
        partial = resumed if resumed is not None and resumed.epoch == epoch else EpochProgress(epoch)
        train = train_one_epoch(model, batches, optimizer, scheduler, partial, dist,
                                cfg.detector, data.normal_share, preempt)
        if train is None:
            save_checkpoint(cfg.out_dir, training_state(
                model, optimizer, epoch - 1, meta, scheduler,
                transform=transform_to_plain(data.transform)), dist, partial)
            preempt.leave(cfg.out_dir / "checkpoint.pt", partial, log.info)
        train_time += time.time() - t0
        val_loss = validation_loss(model, data.x["val"], data.y["val"], dist, cfg.detector,
                                   data.normal_share)
        recorder.log_epoch({"epoch": epoch, **train, "val_loss": val_loss,
                            "lr": scheduler.get_last_lr()[0], "epoch_time_s": time.time() - t0,
                            "samples_per_s": len(batches.tensors[0]) / (time.time() - t0)})
        log.info("epoch %d/%d  train loss %.5f  val loss %.5f  (%.1fs)",
                 epoch + 1, cfg.epochs, train["train_loss"], val_loss, time.time() - t0)
        save_checkpoint(cfg.out_dir, training_state(model, optimizer, epoch, meta, scheduler,
                                                    transform=transform_to_plain(data.transform)), dist)

    result = evaluate(model, data, cfg, dist)
    test, test_unseen, categories = result["test"], result["test_unseen"], result["per_attack_cat"]
    log.info("thresholds %s (validation F1 %.4f)",
             ", ".join(f"{k} {v:.5g}" for k, v in result["thresholds"].items()), result["val_f1"])
    log.info("test: precision %.4f recall %.4f F1 %.4f ROC-AUC %.4f PR-AUC %.4f, normal rows "
             "flagged %.4f (%d rows)", test["precision"], test["recall"], test["f1"],
             test["roc_auc"], test["pr_auc"], test["false_alarm_rate"], test["n"])
    if cfg.split == "random":
        log.info("test rows with no identical row in train: precision %.4f recall %.4f F1 %.4f "
                 "(%d rows)", test_unseen["precision"], test_unseen["recall"],
                 test_unseen["f1"], test_unseen["n"])
    if cfg.holdout is not None:
        log.info("held-out %s: %.4f detected", cfg.holdout, categories[cfg.holdout]["detection_rate"])

    rows = recorder.read_metrics()
    trained_rows = len(batches.tensors[0]) * (cfg.epochs - start_epoch)
    summary = {"detector": cfg.detector, "split": cfg.split, "holdout": cfg.holdout,
               **{k: v for k, v in result.items() if not k.endswith("_scores")}, "score": cfg.score,
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

        write_detector(cfg.out_dir / "detector.pt", net, cfg, data.transform, result["thresholds"])
        plots.training_plots(recorder.plots_dir, rows, result["val_scores"].numpy(),
                             data.y["val"].numpy(), result["test_scores"].numpy(), splits, test,
                             categories, cfg.detector)
    recorder.write_summary(summary, cfg)
    log.info("wrote %s (%.1fs)", cfg.out_dir, time.time() - start)
    return summary


def evaluate(model, data: Data, cfg: Config, dist: DistInfo) -> dict:
    """Calibrate on validation (the autoencoder's feature weights, the thresholds), then measure
    on test: metrics, per-category detection, the hybrid's parts alone, and the scores (score /
    threshold, every row, on every rank) for the plots. Exact at any world size."""
    autoencoder = autoencoder_part(unwrap(model))
    if cfg.score == "normalized" and autoencoder is not None:
        error = normal_feature_error(model, data.x["val"], data.y["val"], dist)
        # A buffer: every rank holds it whole under either strategy.
        autoencoder.error_weight.copy_((1.0 / error.clamp(min=1e-6)).float())
    val_raw = score_rows(model, data.x["val"], dist, cfg.detector)
    thresholds, val_f1 = calibrate(cfg.detector, val_raw.numpy(), data.y["val"].numpy(),
                                   cfg.novelty_alarms)
    test_raw = score_rows(model, data.x["test"], dist, cfg.detector)
    cut = thresholds_tensor(cfg.detector, thresholds)
    val_scores, test_scores = combined_score(val_raw, cut), combined_score(test_raw, cut)
    unseen = torch.from_numpy(~data.splits.test_seen_in_train)
    return {"thresholds": thresholds, "val_f1": val_f1,
            "test": metrics_at(test_scores, data.y["test"], 1.0, dist),
            "test_unseen": metrics_at(test_scores, data.y["test"], 1.0, dist, unseen),
            "per_attack_cat": per_category(test_scores, data.splits.test["attack_cat"].to_numpy(),
                                           1.0, dist),
            "parts": part_metrics(cfg.detector, val_raw, test_raw, data, dist),
            "val_scores": val_scores, "test_scores": test_scores}


def part_metrics(detector: str, val_raw: torch.Tensor, test_raw: torch.Tensor, data: Data,
                 dist: DistInfo) -> dict[str, dict]:
    """The hybrid's parts each measured alone, at their own best-F1 validation threshold.

    The parts train on disjoint parameters with a summed loss (AdamW updates each parameter from
    its own gradient), so with the same epochs, batch and learning rate the classifier part is
    the classifier trained alone, and the autoencoder part never sees an attack row: one hybrid
    run measures all three kinds of detector (what ``anomaly.novel`` relies on).
    """
    if detector != "hybrid":
        return {}
    out = {}
    for column, part in enumerate(PARTS[detector]):
        threshold, val_f1 = best_f1_threshold(val_raw[:, column].numpy(), data.y["val"].numpy())
        scores = test_raw[:, column]
        out[part] = {"threshold": threshold, "val_f1": val_f1,
                     "test": metrics_at(scores, data.y["test"], threshold, dist),
                     "per_attack_cat": per_category(scores, data.splits.test["attack_cat"].to_numpy(),
                                                    threshold, dist)}
    return out


def write_detector(path: Path, net: torch.nn.Module, cfg: Config, transform: FeatureTransform,
                   thresholds: dict[str, float]) -> None:
    """Everything ``anomaly.predict`` needs to score a new CSV, written atomically.

    Tensors and plain values only (the transform through ``transform_to_plain``), so
    ``anomaly.predict`` loads it without running code from the file.
    """
    torch_save_atomic(path, {"detector": cfg.detector, "model": net.state_dict(),
                             "hidden": list(cfg.hidden), "classifier_hidden": list(cfg.classifier_hidden),
                             "transform": transform_to_plain(transform), "thresholds": thresholds,
                             "score": cfg.score})


if __name__ == "__main__":
    run_main(main)
