"""Train a distributed MLP on California house prices; report test RMSE in dollars.

Reads top to bottom: parse_args -> build_data -> build_model -> train_one_epoch / evaluate ->
main. The net regresses the standardised log price; its loss is the MSE of the log price plus
(``--dollar-loss``, on by default) the squared error in dollars, the unit of the test metric.
Predictions are turned back into dollars (and clipped to the file's range, see
housing/data.py) before RMSE, MAE and R^2 are computed.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from common.agree import agreed
from common.checkpoint import load_model_state
from common.config import RunConfig, make_parser
from common.console import get_logger, optional_extra
from common.data import TrainBatches
from common.dist import DistInfo, distributed
from common.errors import UserError, run_main
from common.parallel import local_copy, memory_per_rank, wrap_model
from common.preempt import EpochProgress
from common.rng import seed_everything
from common.run import EpochTally, Run, Training, load_for_evaluation, run_eval_only
from common.tabular import ACTIVATIONS, EMBEDDINGS, ENSEMBLE_MODES, NORMS, TabularArch, TabularMLP
from housing import data as hdata
from housing.loss import loss_fn
from housing.metrics import split_metrics

EXAMPLE = """example:
  torchrun --nproc_per_node=2 housing/train.py --data-dir ../shared/data
  python housing/train.py --eval-only --resume runs/housing   # re-evaluate a saved run
"""
# The shared flags' defaults. The global batch divides by 1-6 and 8 processes, so the same run
# works at those sizes; 480 rather than 960 (twice the steps) and the one-cycle peak lr 7e-3
# are the best on validation over 3 seeds (docs/housing-tuning.md).
DEFAULTS = {"epochs": 60, "batch_size": 480, "lr": 7e-3, "data_dir": "data", "out_dir": "runs/housing"}


@dataclass(frozen=True, kw_only=True)
class Config(RunConfig):
    """The shared fields (common/config.py) and housing's: data, model, optimiser, baselines."""

    PROGRAM: ClassVar[str] = "housing"
    RESUME_OPTIONS: ClassVar[tuple[str, ...]] = ("baselines", "download_url")  # no effect on training

    weight_decay: float  # AdamW decoupled weight decay
    width: int  # hidden units per layer
    depth: int  # hidden layers
    activation: str
    dropout: float  # probability, 0 = off
    norm: str
    patience: int  # epochs without a better validation RMSE before stopping
    features: tuple[str, ...]  # feature groups fed to the net (housing/data.py FEATURE_GROUPS)
    n_clusters: int  # k-means centres for the location-cluster features
    baselines: bool  # also fit LinearRegression and HistGradientBoosting on the same split
    download_url: str
    # The tabular-DL ingredients (common/tabular.py).
    quantile: bool  # inputs through their training quantiles to a normal
    embedding: str  # numeric-feature embedding: none, ple, periodic
    embed_bins: int  # PLE bins / periodic frequencies per feature
    embed_dim: int  # embedding size per feature
    ensemble: int  # k members in one model (TabM); predictions averaged
    ensemble_mode: str  # mini: shared MLP, one adapter per member; packed: k MLPs
    dollar_loss: float  # weight of the squared error in dollars added to the log-space MSE

    def check(self) -> None:
        if self.width < 1 or self.depth < 0:
            raise UserError(f"--width must be >= 1 and --depth >= 0, got {self.width}, {self.depth}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0 or self.patience < 1 or self.n_clusters < 1:
            raise UserError("--weight-decay must be >= 0, --patience and --n-clusters >= 1")
        if not 0 <= self.dollar_loss < math.inf:
            raise UserError(f"--dollar-loss must be a finite number >= 0, got {self.dollar_loss}")
        unknown = set(self.features) - set(hdata.FEATURE_GROUPS)
        if unknown or not self.features:
            raise UserError(
                f"--features: unknown or empty ({', '.join(sorted(unknown))}); "
                f"choose from {', '.join(hdata.FEATURE_GROUPS)}"
            )

    @property
    def arch(self) -> str:
        return TabularArch.of(self).tag

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The model and optimiser flags (also housing/tune.py's and housing/features.py's)."""
        group = parser.add_argument_group("model and optimiser")
        group.add_argument("--width", type=int, default=128, help="hidden units per layer")
        group.add_argument("--depth", type=int, default=2, help="hidden layers")
        group.add_argument("--activation", default="silu", choices=sorted(ACTIVATIONS))
        group.add_argument("--dropout", type=float, default=0.0, help="dropout probability")
        group.add_argument("--norm", default="none", choices=sorted(NORMS), help="per-layer normalisation")
        group.add_argument(
            "--quantile",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="map each input through its training quantiles to a standard normal",
        )
        group.add_argument(
            "--embedding",
            default="ple",
            choices=EMBEDDINGS,
            help="per-feature embedding: piecewise-linear (ple) or periodic, or none",
        )
        group.add_argument(
            "--embed-bins",
            type=int,
            default=48,
            help="PLE bins (quantiles of the training split) / periodic frequencies",
        )
        group.add_argument("--embed-dim", type=int, default=8, help="embedding size per feature")
        group.add_argument(
            "--ensemble", type=int, default=8, help="k ensemble members in one model, TabM-style (1 = a single MLP)"
        )
        group.add_argument(
            "--ensemble-mode",
            default="mini",
            choices=ENSEMBLE_MODES,
            help="mini: shared MLP, per-member input adapter and head; packed: k MLPs",
        )
        group.add_argument(
            "--dollar-loss",
            type=float,
            default=1.0,
            help="weight of the squared error in $100k added to the MSE of the log price (0 = log-space MSE only)",
        )
        group.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
        group.add_argument(
            "--patience", type=int, default=12, help="stop after this many epochs without a better validation RMSE"
        )
        group.add_argument(
            "--features",
            default=",".join(hdata.FEATURE_GROUPS),
            help="comma-separated feature groups fed to the net (see housing/features.py)",
        )
        group.add_argument("--n-clusters", type=int, default=48, help="k-means location clusters")
        group.add_argument(
            "--download-url",
            default=hdata.DOWNLOAD_URL,
            help="where to fetch housing.csv when --data-dir lacks it (SHA-256 checked)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> Config:
        """The Config of a parser with ``add_arguments``' flags: ``--features`` split at commas."""
        features = tuple(f.strip() for f in args.features.split(",") if f.strip())
        return super().from_args(args, **{"features": features, **overrides})


@dataclass
class EarlyStopping:
    """Best validation RMSE so far, its weights, and epochs since; kept in every checkpoint."""

    patience: int
    best_rmse: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    best_model: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def stopped(self) -> bool:
        """True once ``patience`` epochs in a row brought no better validation RMSE."""
        return self.bad_epochs >= self.patience

    def update(self, rmse: float, epoch: int, model: torch.nn.Module) -> bool:
        """Record this epoch; returns True when training should stop."""
        if rmse < self.best_rmse:
            self.best_rmse, self.best_epoch, self.bad_epochs = rmse, epoch, 0
            # Every rank keeps the whole best model (gathered under FSDP) to load it back at the end.
            self.best_model = local_copy(model).state_dict()
        else:
            self.bad_epochs += 1
        return self.stopped

    def restore_best(self, model: torch.nn.Module) -> None:
        """Load the best weights seen into ``model`` (every rank; a no-op before any epoch)."""
        if self.best_model:
            load_model_state(model, self.best_model)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


def parse_args(argv: list[str] | None = None) -> Config:
    parser = make_parser(
        __doc__.splitlines()[0] + "\n\n" + EXAMPLE,
        DEFAULTS,
        eval_only="evaluate the checkpoint given by --resume on validation and test",
    )
    Config.add_arguments(parser)
    parser.add_argument(
        "--no-baselines",
        dest="baselines",
        action="store_false",
        help="skip the LinearRegression / HistGradientBoosting comparison",
    )
    return Config.from_args(parser.parse_args(argv))


def build_data(cfg: Config, dist: DistInfo, saved: dict[str, Any] | None = None) -> hdata.HousingData:
    """Read (or download) and validate the CSV on every rank; call on all ranks (collective).
    ``saved``: a checkpoint whose fitted preprocessor and target statistics to use (--eval-only).

    The ranks then compare verdicts, so a problem seen by any rank (a bad file, or a file
    missing on one node) stops every rank together with the same one-line message, instead of
    one rank failing while torchrun tears down the others mid-sentence.
    """
    preprocessor = target_stats = None
    if saved is not None:
        preprocessor = hdata.preprocessor_from_plain(saved["preprocessor"], saved["loaded_from"])
        target_stats = saved["target_stats"]
    return agreed(
        lambda: hdata.load_housing(
            cfg.data_dir,
            cfg.seed,
            cfg.features,
            cfg.n_clusters,
            url=cfg.download_url,
            preprocessor=preprocessor,
            target_stats=target_stats,
        ),
        dist,
    )


def build_model(cfg: Config, data: hdata.HousingData) -> TabularMLP:
    """The network (common/tabular.py); the training split's features fit its quantile / PLE
    buffers (a checkpoint's weights then replace them in --eval-only)."""
    return TabularMLP(data.train.x.shape[1], TabularArch.of(cfg), train_x=data.train.x)


def build_optimizer(cfg: Config, model: torch.nn.Module, steps: int):
    """AdamW with a one-cycle schedule (warm-up 15%, then cosine decay) stepped per batch."""
    # foreach: the same arithmetic as the per-tensor loop, and under FSDP it keeps the shards'
    # ops on DTensor's cached path (see common/parallel.py).
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    return optimizer, scheduler


def make_loss(cfg: Config, data: hdata.HousingData) -> Callable[[torch.Tensor, tuple], torch.Tensor]:
    """The per-batch loss ``(model output, (x, y)) -> mean over the batch``: housing/loss.py's
    log-price MSE plus ``--dollar-loss`` times the error in dollars."""
    stats = (data.target_mean, data.target_std)
    return lambda out, batch: loss_fn(out, batch[1], dollar_weight=cfg.dollar_loss, target_stats=stats)


def build_training(cfg: Config, data: hdata.HousingData, dist: DistInfo) -> Training:
    """The seeded model (wrapped for DDP or FSDP), its optimizer and schedule, the batches, the loss."""
    seed_everything(cfg.seed)
    batches = TrainBatches([data.train.x, data.train.y], cfg.batch_size, dist, seed=cfg.seed)
    model = wrap_model(build_model(cfg, data), dist, cfg.strategy)
    optimizer, scheduler = build_optimizer(cfg, model, cfg.epochs * len(batches))
    return Training(model, optimizer, scheduler, batches, make_loss(cfg, data))


def train_one_epoch(
    cfg: Config, training: Training, progress: EpochProgress, dist: DistInfo, stop: Callable[[], bool] | None = None
) -> dict[str, float] | None:
    """One pass over the training split from ``progress.step``; returns ``{"train_loss"}``, the
    exact mean loss over all ranks' samples, or None when ``stop()`` said so after a step
    (pre-emption: ``progress`` then says where it stopped)."""
    model, batches = training.model, training.batches
    model.train()
    tally = EpochTally(progress, len(batches), dist)  # on the device: no host sync per step
    for x, y in batches.epoch(progress.epoch, progress.step):
        loss = training.loss(model(x), (x, y))  # mean over this rank's share of the batch
        training.step(loss, progress.step)  # backward of the global batch's mean, AdamW, one-cycle
        tally.add(loss, len(y))
        if tally.stopped(stop):
            return None
    totals = tally.totals()
    return {"train_loss": totals["loss"] / totals["n"]}


def evaluate(
    cfg: Config, model: torch.nn.Module, data: hdata.HousingData, dist: DistInfo, final: bool = False
) -> dict[str, Any]:
    """Validation RMSE / MAE / R^2 in dollars and log-space loss, every sample exactly once
    (housing/metrics.py); ``final``: ``{"val", "test"}``, the test split's per-sample dollar
    predictions (split order) under ``test["predictions"]``."""
    # A float64 copy: per-sample predictions then agree across shardings to ~1e-16, far below
    # the whole-dollar rounding in decode_target (float32 differs by a cent or so). The copy is
    # plain (gathered under FSDP), so forward runs no collectives.
    model = local_copy(model).double().eval()
    val = split_metrics(model, data.val, data, dist)
    if not final:
        return val
    return {"val": val, "test": split_metrics(model, data.test, data, dist, keep_predictions=True)}


def evaluate_checkpoint(cfg: Config, state: dict[str, Any], dist: DistInfo) -> dict[str, Any]:
    """--eval-only (common/run.py): the saved run's best weights and fitted preprocessor, on
    validation and test. ``cfg`` is the run's saved Config."""
    data = build_data(cfg, dist, state)
    weights = state["early_stopping"]["best_model"] or state["model"]
    results = evaluate(cfg, load_for_evaluation(build_model(cfg, data), weights, state, dist), data, dist, final=True)
    results["test"].pop("predictions")
    get_logger("housing", dist).info(
        f"{state['loaded_from']}: test RMSE ${results['test']['rmse']:,.2f}  "
        f"MAE ${results['test']['mae']:,.2f}  R2 {results['test']['r2']:.5f}  ({dist.world_size} process(es))"
    )
    return results


def train(cfg: Config, dist: DistInfo) -> dict[str, Any]:
    """Train (or resume) with early stopping, then test the best weights; returns the summary."""
    started = time.time()
    log = get_logger("housing", dist)
    data = build_data(cfg, dist)  # validated before any output exists
    log.info(
        f"{data.csv_path}: {len(data.train.y)} train / {len(data.val.y)} val / "
        f"{len(data.test.y)} test rows, {data.train.x.shape[1]} features; "
        f"{dist.world_size} process(es), global batch {cfg.batch_size}"
    )
    training = build_training(cfg, data, dist)
    model, stopper = training.model, EarlyStopping(cfg.patience)
    meta = {"program": "housing", "arch": cfg.arch, "features": list(cfg.features)}
    fitted = {
        "preprocessor": hdata.preprocessor_to_plain(data.preprocessor),
        "target_stats": (data.target_mean, data.target_std),
    }
    run = Run(cfg, dist, meta, training, keep={"early_stopping": stopper}, constants=fitted)

    train_started, epochs_run = time.time(), 0
    for progress in run.epochs():
        if stopper.stopped:  # early stopping, or a resumed run that had already stopped
            break
        t0 = time.time()
        train = train_one_epoch(cfg, training, progress, dist, stop=run.stop_requested)
        if train is None:  # pre-empted: checkpoint the step reached, exit 75
            run.leave(progress)
        epoch_train_s = time.time() - t0  # the training pass alone: what samples/s measures
        val = evaluate(cfg, model, data, dist)
        stopper.update(val["rmse"], progress.epoch, model)
        epochs_run += 1
        row = {
            "epoch": progress.epoch,
            **train,
            "val_loss": val["loss"],
            "val_rmse": val["rmse"],
            "val_mae": val["mae"],
            "val_r2": val["r2"],
            "lr": training.scheduler.get_last_lr()[0],
            "epoch_s": time.time() - t0,
            "samples_per_s": len(data.train.y) / epoch_train_s,
        }
        log.info(
            f"epoch {progress.epoch + 1:3d}/{cfg.epochs}  train loss {train['train_loss']:.4f}  "
            f"val loss {val['loss']:.4f}  val RMSE ${val['rmse']:,.0f}  ({row['epoch_s']:.1f}s)"
        )
        run.log_epoch(row)
        run.save(progress.epoch)
    stopper.restore_best(model)
    train_s = time.time() - train_started
    test = evaluate(cfg, model, data, dist, final=True)["test"]
    predictions = test.pop("predictions")
    log.info(
        f"test RMSE ${test['rmse']:,.0f}  MAE ${test['mae']:,.0f}  R2 {test['r2']:.4f}  "
        f"(best epoch {stopper.best_epoch + 1}, val RMSE ${stopper.best_rmse:,.0f})"
    )

    from housing import report  # matplotlib / baselines load only once training is done

    wall = time.time() - started
    summary = {
        "test": test,
        "best_epoch": stopper.best_epoch,
        "best_val_rmse": stopper.best_rmse,
        "epochs_run": epochs_run,
        "baselines": None,
        "wall_time_s": wall,
        "train_time_s": train_s,
        "samples_per_s": epochs_run * len(data.train.y) / max(train_s, 1e-9),
        "memory_per_rank": memory_per_rank(model, training.optimizer),
    }
    run.write_summary(summary)  # the results reach disk before any extra
    run.write_text("results.md", report.results_table(test, None, cfg.arch))
    log.info(f"wrote {cfg.out_dir}/summary.json and results.md in {wall:.1f}s")
    # The extras run on rank 0 after the last collective: no rank waits on them.
    if dist.is_main:
        optional_extra("plots", lambda: report.plot_all(run.read_metrics(), data.test, predictions, run.plots_dir), log)
        baselines = None
        if cfg.baselines:
            baselines = optional_extra("baselines", lambda: report.run_baselines(data, cfg.seed), log)
        if baselines is not None:
            summary["baselines"] = baselines
            run.write_summary(summary)
            run.write_text("results.md", report.results_table(test, baselines, cfg.arch))
        log.info(f"wrote plots/{' and baselines' if baselines else ''} in {time.time() - started - wall:.1f}s")
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    with distributed(cfg.device, cfg.dist_timeout) as dist:
        if cfg.eval_only:
            run_eval_only(cfg, dist, evaluate_checkpoint, ("early_stopping", "preprocessor", "target_stats"))
        else:
            train(cfg, dist)


if __name__ == "__main__":
    run_main(main)
