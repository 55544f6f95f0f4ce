"""Train a detector of attacks in UNSW-NB15 traffic with DDP (or FSDP) and measure it honestly.

``--detector`` picks what is trained (``anomaly/model.py``):
- ``classifier`` (default, best F1 on the honest split): supervised, every labelled training row;
- ``autoencoder``: semi-supervised, normal training rows only; its score is the reconstruction
  error, so it can flag attacks of a kind no label has shown;
- ``hybrid``: both, trained together; an attack if the classifier says so, *or* the classifier's
  ensemble members disagree on the row (one unlike any it was taught), *or* the autoencoder finds
  it unlike normal traffic; the two novelty watchers flag at most ``--novelty-alarms`` of the
  normal validation rows, half each.

Thresholds are chosen on the validation split (never on test). By default the split keeps every
group of identical feature rows on one side (``--split grouped``), so no test row has a copy in
train; ``--split random`` gives the usual random split for comparison with published figures.
Test precision, recall, F1 come from a confusion matrix summed over ranks; ROC-AUC and PR-AUC
from the per-sample scores gathered in original order, so every figure is the same at any world
size. ``--eval-only --resume RUN_DIR`` evaluates a saved run again (eval.json), with its own
``--novelty-alarms`` and ``--score`` if given: that is how 1, 2 and 3 processes are compared on
the same weights (resuming a finished run, the same ``--epochs``, also trains nothing).

Writes metrics.jsonl, summary.json, checkpoint.pt, plots/ and detector.pt (network, feature
transform and thresholds, for ``anomaly.predict``) in --out-dir."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from anomaly.data import SPLITS, Splits, hold_out, split_data
from anomaly.features import FeatureTransform, make_features, transform_from_plain, transform_to_plain
from anomaly.metrics import calibrate, figures, log_result, metrics_at, part_metrics, per_category
from anomaly.model import PARTS, combined_score, make_detector, parse_widths, thresholds_tensor, training_loss
from anomaly.predict import write_detector
from anomaly.scoring import autoencoder_part, normal_feature_error, score_rows, validation_loss
from common.agree import agreed
from common.config import RunConfig, make_parser
from common.console import get_logger, optional_extra
from common.console import progress as progress_bar
from common.data import TrainBatches
from common.dist import DistInfo, distributed
from common.errors import UserError, run_main
from common.parallel import local_copy, memory_per_rank, unwrap, wrap_model
from common.preempt import EpochProgress
from common.rng import seed_everything
from common.run import EpochTally, Run, Training, load_for_evaluation, run_eval_only
from common.tabular import EMBEDDINGS

EXAMPLE = "torchrun --nproc_per_node=2 anomaly/train.py --data-dir ../shared/data"
DETECTORS = tuple(PARTS)
# The shared flags' defaults; the --detector chosen then sets its own (PRESETS).
DEFAULTS = {"epochs": 30, "batch_size": 256, "lr": 3e-3, "data_dir": "data", "out_dir": "runs/anomaly"}
# Per detector: epochs, global batch, peak lr; --epochs, --batch-size, --lr override them. The
# autoencoder's epochs pass over the normal training rows only (about 45% of them).
PRESETS = {
    "autoencoder": dict(epochs=100, batch_size=240, lr=3e-3),
    "classifier": dict(epochs=30, batch_size=256, lr=3e-3),
    "hybrid": dict(epochs=30, batch_size=256, lr=3e-3),
}


@dataclass(frozen=True, kw_only=True)
class Config(RunConfig):
    """The shared fields (common/config.py; ``batch_size`` counts normal rows only for the
    autoencoder) and anomaly's: detector, split, features, scoring."""

    PROGRAM: ClassVar[str] = "anomaly"
    # --eval-only takes these from its command line (how to score), the rest from the checkpoint.
    EVAL_OPTIONS: ClassVar[tuple[str, ...]] = ("novelty_alarms", "score")
    RESUME_OPTIONS: ClassVar[tuple[str, ...]] = ("novelty_alarms", "score")  # thresholds only

    weight_decay: float
    detector: str  # "autoencoder", "classifier" or "hybrid" (anomaly/model.py)
    split: str  # "grouped" (identical rows on one side) or "random"
    hidden: tuple[int, ...]  # autoencoder encoder widths; the last is the code size
    classifier_hidden: tuple[int, ...]  # classifier MLP widths (one width, repeated)
    # The classifier's tabular-network parts (common/tabular.py).
    embedding: str  # numeric-feature embedding: none, ple, periodic
    embed_bins: int  # PLE bins / periodic frequencies per feature
    embed_dim: int  # embedding size per feature
    ensemble: int  # k TabM-mini members in one classifier; probabilities averaged
    novelty_alarms: float  # hybrid: share of normal validation rows its novelty watchers may flag
    holdout: str | None  # attack_cat removed from train and validation (novel-attack study)
    val_fraction: float  # of all rows (one file) or of the training file (two files)
    test_fraction: float  # of all rows when one file is split
    pca_variance: float  # fraction of variance the PCA components keep, (0, 1)
    min_frequency: int  # rows; rarer categorical levels are folded into one
    score: str  # "mse" or "normalized" (per-feature error / normal-validation error)
    max_rows: int | None  # stratified subset of each file, for quick runs

    def check(self) -> None:
        if not (
            0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1
        ):
            raise UserError("--val-fraction and --test-fraction must be in (0, 1) and sum to less than 1")
        if not 0 < self.pca_variance < 1:
            raise UserError(f"--pca-variance must be in (0, 1), got {self.pca_variance}")
        if not 0 < self.novelty_alarms < 1:
            raise UserError(f"--novelty-alarms must be in (0, 1), got {self.novelty_alarms}")
        if self.min_frequency < 1:
            raise UserError(f"--min-frequency must be at least 1, got {self.min_frequency}")
        if self.max_rows is not None and self.max_rows < 100:
            raise UserError(f"--max-rows must be at least 100, got {self.max_rows}")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be non-negative, got {self.weight_decay}")
        if self.ensemble < 1 or self.embed_bins < 1 or self.embed_dim < 1:
            raise UserError("--ensemble, --embed-bins and --embed-dim must be >= 1")

    @property
    def classifier_options(self) -> dict:
        """The classifier's ``common.tabular`` options (``anomaly.model.Classifier``)."""
        return {
            "embedding": self.embedding,
            "embed_bins": self.embed_bins,
            "embed_dim": self.embed_dim,
            "ensemble": self.ensemble,
        }

    @property
    def arch(self) -> str:
        parts = f"-{self.embedding}{self.embed_bins}x{self.embed_dim}" if self.embedding != "none" else ""
        return (
            f"{self.detector}-ae{'-'.join(map(str, self.hidden))}-clf{'-'.join(map(str, self.classifier_hidden))}"
            f"{parts}-k{self.ensemble}"
        )


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


def parse_args(argv: list[str] | None = None) -> Config:
    parser = make_parser(
        f"{__doc__.splitlines()[0]}\n\nexamples:\n  {EXAMPLE}\n  "
        f"{EXAMPLE} --detector hybrid\n  "
        "python anomaly/train.py --data-dir ../shared/data --epochs 5   # one process, quick\n\n"
        "--epochs, --batch-size and --lr default per detector (epochs / batch / lr): "
        + "; ".join(f"{d} {p['epochs']} / {p['batch_size']} / {p['lr']:g}" for d, p in PRESETS.items()),
        DEFAULTS,
        eval_only="evaluate the checkpoint given by --resume (its thresholds chosen again on "
        "validation with this --novelty-alarms and --score), no training",
    )
    group = parser.add_argument_group("anomaly")
    group.add_argument(
        "--detector",
        choices=DETECTORS,
        default="classifier",
        help="classifier: supervised; autoencoder: normal traffic only; hybrid: both, an attack if either flags it",
    )
    group.add_argument(
        "--split",
        choices=SPLITS,
        default="grouped",
        help="grouped: identical feature rows stay on one side (no test row has a "
        "copy in train); random: rows split independently",
    )
    group.add_argument("--hidden", default="128,64,16", help="autoencoder encoder widths")
    group.add_argument(
        "--classifier-hidden", default="128,128,128", help="classifier MLP widths (one width per layer, all equal)"
    )
    group.add_argument(
        "--embedding",
        default="ple",
        choices=EMBEDDINGS,
        help="classifier: per-feature embedding, piecewise-linear over training "
        "quantile bins (ple) or periodic, or none (common/tabular.py)",
    )
    group.add_argument("--embed-bins", type=int, default=96, help="PLE bins / periodic frequencies")
    group.add_argument("--embed-dim", type=int, default=8, help="embedding size per feature")
    group.add_argument(
        "--ensemble", type=int, default=8, help="classifier: k TabM-mini members sharing one MLP (1 = a single MLP)"
    )
    group.add_argument(
        "--novelty-alarms",
        type=float,
        default=0.01,
        help="hybrid: the novelty watchers (the classifier members' disagreement "
        "and the autoencoder, half each) flag at most this share of normal "
        "validation rows; the classifier's threshold is tuned given those alarms",
    )
    group.add_argument(
        "--holdout",
        default=None,
        metavar="ATTACK_CAT",
        help="remove this attack category from train and validation (test keeps "
        "it): how well is a never-seen kind of attack caught?",
    )
    group.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    group.add_argument("--val-fraction", type=float, default=0.15, help="validation share")
    group.add_argument("--test-fraction", type=float, default=0.30, help="test share when a single file is split")
    group.add_argument(
        "--pca-variance", type=float, default=0.999, help="explained variance the PCA components must reach"
    )
    group.add_argument(
        "--min-frequency", type=int, default=20, help="categorical levels rarer than this (rows) are folded together"
    )
    group.add_argument(
        "--score",
        choices=["mse", "normalized"],
        default="mse",
        help="autoencoder score: mse = mean squared error over scaled features; "
        "normalized = each feature's error / its mean on normal validation rows",
    )
    group.add_argument(
        "--max-rows", type=int, default=None, help="use a stratified subset of this many rows per file (quick runs)"
    )
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESETS[known.detector])
    args = parser.parse_args(argv)
    return Config.from_args(
        args,
        hidden=parse_widths("--hidden", args.hidden),
        classifier_hidden=parse_widths("--classifier-hidden", args.classifier_hidden),
    )


def build_data(cfg: Config, dist: DistInfo, saved: dict[str, Any] | None = None) -> Data:
    """Read, validate and split the files; fit the features on normal training rows only (or
    take ``saved``'s, a checkpoint's, for --eval-only). Every rank does this identically (all
    steps are deterministic), so nothing is broadcast; a problem with the files on any rank
    stops every rank with one line (``agreed``).
    """
    transform = transform_from_plain(saved["transform"], saved["loaded_from"]) if saved is not None else None

    def read() -> Data:
        splits = split_data(cfg.data_dir, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.max_rows, cfg.split)
        if cfg.holdout is not None:
            splits = hold_out(splits, cfg.holdout)
        return Data(splits, *make_features(splits, cfg.min_frequency, cfg.pca_variance, transform))

    return agreed(read, dist)


def build_model(cfg: Config, data: Data) -> torch.nn.Module:
    """The network ``cfg.detector`` names, with the fitted PCA, input columns and embedding bins
    (cut on the training rows) as buffers."""
    return make_detector(
        cfg.detector, data.transform, cfg.hidden, cfg.classifier_hidden, cfg.classifier_options, train_x=data.x["train"]
    )


def build_optimizer(cfg: Config, model: torch.nn.Module, steps: int):
    """AdamW with a one-cycle schedule stepped per batch."""
    # foreach: under FSDP a per-tensor loop misses DTensor's sharding cache every step
    # (common/parallel.py, docs/fsdp.md).
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=steps)
    return optimizer, scheduler


def make_loss(cfg: Config, data: Data) -> Callable[[torch.Tensor, tuple], torch.Tensor]:
    """The per-batch loss ``(model output, (x, y)) -> mean over the batch``: the detector's
    (anomaly/model.py ``training_loss``; the hybrid's autoencoder term scaled by the normal share)."""
    return lambda out, batch: training_loss(cfg.detector, out, batch[0], batch[1], data.normal_share)


def build_training(cfg: Config, data: Data, dist: DistInfo) -> Training:
    """The seeded model (wrapped for DDP or FSDP), its optimizer and schedule, the batches of
    the rows the detector learns from, the loss."""
    seed_everything(cfg.seed)
    model = wrap_model(build_model(cfg, data), dist, cfg.strategy)
    batches = TrainBatches(list(data.training_rows(cfg.detector)), cfg.batch_size, dist, cfg.seed)
    optimizer, scheduler = build_optimizer(cfg, model, cfg.epochs * len(batches))
    return Training(model, optimizer, scheduler, batches, make_loss(cfg, data))


def train_one_epoch(
    cfg: Config, training: Training, progress: EpochProgress, dist: DistInfo, stop: Callable[[], bool] | None = None
) -> dict[str, float] | None:
    """One pass over the training rows from ``progress.step``; returns ``{"train_loss"}``, the
    exact mean loss per row over all ranks, or None when ``stop()`` said so after a step
    (pre-emption: ``progress`` then says where it stopped)."""
    model, batches, epoch = training.model, training.batches, progress.epoch
    model.train()
    tally = EpochTally(progress, len(batches), dist)  # on the device: no host sync per step
    rows = batches.epoch(epoch, progress.step)
    for x, labels in progress_bar(rows, dist, len(batches) - progress.step, f"epoch {epoch}"):
        # The autoencoder reconstructs x (its rows are all normal); the classifier predicts labels.
        loss = training.loss(model(x), (x, labels))  # mean over this rank's rows
        training.step(loss, progress.step)  # ranks' shares of the last batch may differ: global mean
        tally.add(loss, len(x))
        if tally.stopped(stop):
            return None
    totals = tally.totals()
    return {"train_loss": totals["loss"] / totals["n"]}


def evaluate(cfg: Config, model: torch.nn.Module, data: Data, dist: DistInfo, final: bool = False) -> dict[str, Any]:
    """The validation loss; ``final``: calibrate on validation (the autoencoder's feature
    weights, the thresholds), then measure on test: metrics, per-category detection, the
    hybrid's parts alone, and the scores (score / threshold, every row, on every rank) for the
    plots. Exact at any world size."""
    if not final:
        return {"val_loss": validation_loss(model, data.x["val"], data.y["val"], dist, cfg.detector, data.normal_share)}
    autoencoder = autoencoder_part(unwrap(model))
    if cfg.score == "normalized" and autoencoder is not None:
        error = normal_feature_error(model, data.x["val"], data.y["val"], dist)
        # A buffer: every rank holds it whole under either strategy.
        autoencoder.error_weight.copy_((1.0 / error.clamp(min=1e-6)).float())
    val_raw = score_rows(model, data.x["val"], dist, cfg.detector)
    thresholds, val_f1 = calibrate(PARTS[cfg.detector], val_raw.numpy(), data.y["val"].numpy(), cfg.novelty_alarms)
    test_raw = score_rows(model, data.x["test"], dist, cfg.detector)
    cut = thresholds_tensor(PARTS[cfg.detector], thresholds)
    val_scores, test_scores = combined_score(val_raw, cut), combined_score(test_raw, cut)
    unseen = torch.from_numpy(~data.splits.test_seen_in_train)
    return {
        "thresholds": thresholds,
        "val_f1": val_f1,
        "test": metrics_at(test_scores, data.y["test"], 1.0, dist),
        "test_unseen": metrics_at(test_scores, data.y["test"], 1.0, dist, unseen),
        "per_attack_cat": per_category(test_scores, data.splits.test["attack_cat"].to_numpy(), 1.0, dist),
        "parts": part_metrics(cfg.detector, val_raw, test_raw, data, dist, cfg.novelty_alarms),
        "val_scores": val_scores,
        "test_scores": test_scores,
    }


def evaluate_checkpoint(cfg: Config, state: dict[str, Any], dist: DistInfo) -> dict[str, Any]:
    """--eval-only (common/run.py): the saved weights and feature transform, thresholds chosen
    again on validation; ``cfg``: the saved run's Config, this command's EVAL_OPTIONS."""
    data = build_data(cfg, dist, state)
    model = load_for_evaluation(build_model(cfg, data), state["model"], state, dist)
    result = evaluate(cfg, model, data, dist, final=True)
    log_result(result, cfg, get_logger("anomaly", dist))
    return {
        "detector": cfg.detector,
        "split": cfg.split,
        "holdout": cfg.holdout,
        "score": cfg.score,
        "novelty_alarms": cfg.novelty_alarms,
        **figures(result),
    }


def train(cfg: Config, dist: DistInfo) -> dict[str, Any]:
    """Train (or resume) and evaluate one detector; returns the summary (``anomaly.novel`` calls
    this once per held-out category, in one process group)."""
    start = time.time()
    log = get_logger("anomaly", dist)
    data = build_data(cfg, dist)  # every file validated before anything is written
    splits = data.splits
    log.info(
        "data: %s; train %d (%d normal) / val %d / test %d rows (%d test rows have an "
        "identical row in train); %d features -> %d PCA components; detector %s",
        splits.source,
        len(splits.train),
        len(data.x["train_normal"]),
        len(splits.val),
        len(splits.test),
        int(splits.test_seen_in_train.sum()),
        data.transform.n_features,
        data.transform.n_components,
        cfg.detector,
    )
    training = build_training(cfg, data, dist)
    model, rows_per_epoch = training.model, len(training.batches.tensors[0])
    meta = {"program": "anomaly", "arch": cfg.arch}
    run = Run(cfg, dist, meta, training, constants={"transform": transform_to_plain(data.transform)})

    train_time = 0.0
    for progress in run.epochs():
        t0 = time.time()
        train = train_one_epoch(cfg, training, progress, dist, stop=run.stop_requested)
        if train is None:  # pre-empted: checkpoint the step reached, exit 75
            run.leave(progress)
        epoch_train_s = time.time() - t0  # the training pass alone: what samples/s measures
        train_time += epoch_train_s
        val = evaluate(cfg, model, data, dist)
        run.log_epoch(
            {
                "epoch": progress.epoch,
                **train,
                **val,
                "lr": training.scheduler.get_last_lr()[0],
                "epoch_s": time.time() - t0,
                "samples_per_s": rows_per_epoch / epoch_train_s,
            }
        )
        log.info(
            "epoch %d/%d  train loss %.5f  val loss %.5f  (%.1fs)",
            progress.epoch + 1,
            cfg.epochs,
            train["train_loss"],
            val["val_loss"],
            time.time() - t0,
        )
        run.save(progress.epoch)

    result = evaluate(cfg, model, data, dist, final=True)
    log_result(result, cfg, log)
    epochs_run = cfg.epochs - run.start_epoch
    summary = {
        "detector": cfg.detector,
        "split": cfg.split,
        "holdout": cfg.holdout,
        **figures(result),
        "score": cfg.score,
        "data": {
            "source": splits.source,
            "train_rows": len(splits.train),
            "train_normal_rows": len(data.x["train_normal"]),
            "val_rows": len(splits.val),
            "test_rows": len(splits.test),
            "test_seen_in_train": int(splits.test_seen_in_train.sum()),
        },
        "features": data.transform.describe(),
        "epochs_run": epochs_run,
        "train_time_s": train_time,
        "samples_per_s": rows_per_epoch * epochs_run / train_time if train_time else None,
        "memory_per_rank": memory_per_rank(model, training.optimizer),
        "wall_time_s": time.time() - start,
    }
    net = local_copy(model)  # every rank: a collective under FSDP, the last one of the run
    run.write_summary(summary)  # the results reach disk before any extra
    if dist.is_main:
        from anomaly.plots import draw_plots  # matplotlib loads only here, at the end

        write_detector(cfg.out_dir / "detector.pt", net, cfg, data.transform, result["thresholds"])
        metrics = run.read_metrics()
        optional_extra("plots", lambda: draw_plots(run.plots_dir, metrics, result, data, cfg), log)
    log.info("wrote %s (%.1fs)", cfg.out_dir, time.time() - start)
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    with distributed(cfg.device, cfg.dist_timeout) as dist:
        if cfg.eval_only:
            run_eval_only(cfg, dist, evaluate_checkpoint, ("transform",))
        else:
            train(cfg, dist)


if __name__ == "__main__":
    run_main(main)
