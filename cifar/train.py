"""Train a CIFAR-10 classifier (DDP or FSDP): the dataset on the device, augmentation on the batch.

Each epoch logs train and test loss/accuracy reduced exactly across ranks; the end writes the
test confusion matrix (all-reduced), per-class accuracy and images/second to summary.json, and
loss/accuracy curves and the confusion matrix to plots/.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cifar.data import Augment, CifarData, alternating_flips, load, normalize, prepare_batch, subset
from cifar.model import AirNet, BatchNorm, bf16_autocast, resnet18, use_bf16
from cifar.optim import Lookahead, Muon, triangular
from cifar.plots import plot_run
from cifar.presets import PRESETS, resolve_preset
from common.agree import on_local_rank_zero_first, stop_unless_all_ranks_agree, tensor_digest
from common.config import RunConfig, make_parser
from common.console import get_logger, optional_extra
from common.console import progress as progress_bar
from common.data import TrainBatches, eval_batches
from common.dist import DistInfo, distributed
from common.errors import UserError, run_main
from common.metrics import all_reduce_tensor, confusion_matrix, reduce_sums
from common.parallel import memory_per_rank, unwrap, wrap_model
from common.preempt import EpochProgress
from common.rng import seed_everything
from common.run import EpochTally, Run, Training, load_for_evaluation, run_eval_only
from common.timing import DeviceClock

EXAMPLES = """examples:
  torchrun --nproc_per_node=2 cifar/train.py --data-dir ../shared/data --preset cpu
  torchrun --nproc_per_node=8 cifar/train.py --data-dir data --preset airbench94
  python cifar/train.py --device cpu --epochs 1
  python cifar/train.py --arch resnet18 --weights resnet18-f37072fd.pth --preset resnet18
"""
# The shared flags' defaults; the --preset chosen (cifar/presets.py) then sets its own.
DEFAULTS = {"epochs": 5, "batch_size": 512, "lr": 0.75, "data_dir": "data", "out_dir": "runs/cifar"}


@dataclass(frozen=True, kw_only=True)
class Config(RunConfig):
    """The shared fields (common/config.py) and cifar's: recipe, model, augmentation, precision."""

    PROGRAM: ClassVar[str] = "cifar"
    # --eval-only takes these from its command line (how to evaluate), the rest from the checkpoint.
    EVAL_OPTIONS: ClassVar[tuple[str, ...]] = ("tta", "amp", "eval_batch_size", "test_limit", "download")
    # The preset's name (its settings are compared one by one), and what only evaluation uses.
    RESUME_OPTIONS: ClassVar[tuple[str, ...]] = (
        "preset",
        "target_accuracy",
        "tta",
        "eval_batch_size",
        "test_limit",
        "download",
    )

    preset: str
    arch: str  # "airnet" or "resnet18"
    widths: tuple[int, int, int]  # channels of the three conv groups (airnet)
    depth: int  # convs per group (airnet), >= 1
    residual: bool  # skip connections around the extra convs of each group
    weights: str | None  # resnet18: state_dict path, "none", or None = torchvision cache/download
    lr_start: float  # schedule start, as a fraction of lr
    lr_end: float  # schedule end, as a fraction of lr
    warmup: float  # fraction of the steps spent rising to the peak
    momentum: float  # Nesterov momentum
    optimizer: str  # "sgd", or "muon": Muon for the conv filters, SGD for the rest (airnet)
    muon_lr: float  # Muon's step along the orthogonalised momentum (per schedule factor 1)
    muon_momentum: float  # Muon's Nesterov momentum
    weight_decay: float  # L2 coefficient (biases of BatchNorm get weight_decay / bias_lr_scale)
    bias_lr_scale: float  # BatchNorm shifts learn this many times faster (airbench)
    whiten_bias_epochs: int  # epochs the whitening conv's bias trains before it is frozen
    label_smoothing: float  # 0 = off
    translate: int  # pixels, 0 = off
    flip: bool
    alternating_flip: bool  # each image flipped every other epoch (airbench), not at random
    cutout: int  # pixels, 0 = off
    tta: bool  # also predict on the flipped test image and average the logits
    lookahead: bool  # airbench's Lookahead-EMA of the weights (every 5 steps, rising decay)
    amp: str  # "auto" (bf16 on CUDA and bf16-capable CPUs), "bf16", "off"
    channels_last: bool
    compile: bool
    eval_batch_size: int  # per rank
    train_per_class: int | None  # use a class-balanced subset of the training set
    test_limit: int | None  # use the first N test images
    target_accuracy: float | None  # report when test accuracy first reaches this
    download: bool
    # BatchNorm statistics and augmentation draws over the global batch, not each rank's share
    # of it: the same optimisation at any world size (one all-reduce per BatchNorm layer).
    world_size_invariant: bool

    def check(self) -> None:
        checks = [
            (self.depth >= 1, f"--depth must be >= 1, got {self.depth}"),
            (min(self.widths) >= 1, f"--widths must be positive, got {self.widths}"),
            (0 <= self.warmup < 1, f"--warmup must be in [0, 1), got {self.warmup}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.bias_lr_scale > 0, f"--bias-lr-scale must be positive, got {self.bias_lr_scale}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.translate <= 8, f"--translate must be 0..8 pixels, got {self.translate}"),
            (0 <= self.cutout <= 32, f"--cutout must be 0..32 pixels, got {self.cutout}"),
            (self.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.eval_batch_size}"),
            (self.train_per_class is None or self.train_per_class >= 1, "--train-per-class must be >= 1"),
            (self.test_limit is None or self.test_limit >= 1, "--test-limit must be >= 1"),
            (self.weights is None or self.arch == "resnet18", "--weights applies to --arch resnet18 only"),
            (
                not self.world_size_invariant or self.arch == "airnet",
                "--world-size-invariant applies to --arch airnet only",
            ),
            (self.optimizer == "sgd" or self.arch == "airnet", "--optimizer muon applies to --arch airnet only"),
            (self.muon_lr > 0, f"--muon-lr must be positive, got {self.muon_lr}"),
            (0 <= self.muon_momentum < 1, f"--muon-momentum must be in [0, 1), got {self.muon_momentum}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass
class CifarTraining(Training):
    """``Training`` and what cifar's step needs besides: the forward's precision, Lookahead's
    average (or None), and the seconds spent fitting the whitening layer (airbench times it)."""

    bf16: bool
    lookahead: Lookahead | None
    whiten_s: float


class RaceClock:
    """The run's timings as airbench reports them, kept across resumes: the device time of
    the timed sections (``timed``: whitening, training steps), the wall time since the first
    launch (``elapsed_s``), and when the target accuracy was first reached."""

    def __init__(self, device: torch.device, whiten_s: float, wall_start: float) -> None:
        self.device, self.wall_start, self.elapsed_before = device, wall_start, 0.0
        self.clock = DeviceClock(device, whiten_s)
        self.time_to_target_s: float | None = None
        self.wall_to_target_s: float | None = None

    def timed(self):
        """Count the block's device time (``common.timing.DeviceClock``)."""
        return self.clock.timed()

    @property
    def seconds(self) -> float:
        return self.clock.seconds

    @property
    def elapsed_s(self) -> float:
        """Wall seconds of this launch plus those of the launches it resumes."""
        return self.elapsed_before + time.time() - self.wall_start

    def state_dict(self) -> dict[str, Any]:
        return {
            "elapsed_s": self.elapsed_s,
            "timed_s": self.clock.seconds,
            "time_to_target_s": self.time_to_target_s,
            "wall_to_target_s": self.wall_to_target_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.elapsed_before = state["elapsed_s"]
        self.clock = DeviceClock(self.device, state["timed_s"])
        self.time_to_target_s, self.wall_to_target_s = state["time_to_target_s"], state["wall_to_target_s"]


def parse_args(argv: list[str] | None = None) -> Config:
    parser = make_parser(
        __doc__ + "\n" + EXAMPLES, DEFAULTS, eval_only="evaluate the --resume checkpoint on the test set, no training"
    )
    p = parser.add_argument_group("cifar")
    p.add_argument(
        "--preset",
        default="auto",
        choices=["auto", *PRESETS],
        help="recipe defaults: auto = airbench94 on CUDA, cpu otherwise",
    )
    p.add_argument("--arch", default="airnet", choices=["airnet", "resnet18"])
    p.add_argument(
        "--widths",
        type=int,
        nargs=3,
        default=[64, 256, 256],
        metavar="C",
        help="airnet: channels of the three conv groups",
    )
    p.add_argument("--depth", type=int, default=2, help="airnet: convs per group")
    p.add_argument(
        "--residual",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="airnet: residual connections around each group's convs after the first "
        "(--no-residual: plain, as airbench94)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="resnet18: pretrained state_dict file, or 'none' for random init "
        "(default: torchvision's cache, else download)",
    )
    p.add_argument("--lr-start", type=float, default=0.2, help="triangular schedule start (x lr)")
    p.add_argument("--lr-end", type=float, default=0.07, help="triangular schedule end (x lr)")
    p.add_argument("--warmup", type=float, default=0.23, help="fraction of steps rising to lr")
    p.add_argument("--momentum", type=float, default=0.85, help="Nesterov momentum")
    p.add_argument(
        "--optimizer",
        default="sgd",
        choices=["sgd", "muon"],
        help="airnet: muon = Muon (orthogonalised momentum) for the conv filters and "
        "SGD for the head and biases, as airbench94_muon; sgd = SGD for all",
    )
    p.add_argument("--muon-lr", type=float, default=0.24, help="--optimizer muon: the filters' lr")
    p.add_argument("--muon-momentum", type=float, default=0.6, help="--optimizer muon: the filters' Nesterov momentum")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=0.0153 / 11.5,
        help="L2 coefficient (airbench's 0.0153 per 1024 images at lr 11.5)",
    )
    p.add_argument(
        "--bias-lr-scale", type=float, default=64.0, help="airnet: BatchNorm shifts train this many times faster"
    )
    p.add_argument(
        "--whiten-bias-epochs", type=int, default=3, help="airnet: epochs before the whitening bias is frozen"
    )
    p.add_argument("--label-smoothing", type=float, default=0.2, help="0 = off")
    p.add_argument("--translate", type=int, default=2, help="random shift in pixels, 0 = off")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no random flips")
    p.add_argument(
        "--alternating-flip",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="airbench's flips: a random half of the images in even epochs, the other "
        "half in odd ones, instead of a coin per image and epoch",
    )
    p.add_argument("--cutout", type=int, default=0, help="cutout square side in pixels, 0 = off")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True, help="test-time flip augmentation")
    p.add_argument(
        "--lookahead",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="airbench's Lookahead-EMA: every 5 steps pull the weights toward their "
        "running average, more strongly late in training",
    )
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the model (on CPU this forces fp32, see use_bf16)",
    )
    p.add_argument("--eval-batch-size", type=int, default=500, help="per rank")
    p.add_argument("--train-per-class", type=int, default=None, metavar="N")
    p.add_argument("--test-limit", type=int, default=None, metavar="N")
    p.add_argument("--target-accuracy", type=float, default=None, metavar="FRACTION")
    p.add_argument("--no-download", dest="download", action="store_false")
    p.add_argument(
        "--world-size-invariant",
        action="store_true",
        help="BatchNorm statistics and augmentation draws over the whole global batch "
        "instead of each process's share: 1 or 8 processes then train alike (one "
        "small all-reduce per BatchNorm layer and step)",
    )
    known, _ = parser.parse_known_args(argv)
    preset = resolve_preset(known.preset, known.device)
    parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    return Config.from_args(args, preset=preset, widths=tuple(args.widths))


def build_data(cfg: Config, dist: DistInfo, saved: dict[str, Any] | None = None) -> CifarData:
    """Decode (or load the cache) on each node's local rank 0 while the others wait, then load.
    (``saved``, a checkpoint for --eval-only, holds nothing the data needs.)

    ``on_local_rank_zero_first`` sends a data error found on any rank to every rank, so each
    exits with the same message. Each node decodes and caches its own copy: nodes without a
    shared filesystem each build one in their own data dir; nodes that share one may both build
    it (the cache is written to a temp file per process and renamed, so they cannot damage each
    other's) and then read the same file. Either way the ranks then compare a digest of the data
    they will train on, so nodes holding different files (another CIFAR copy, a stale cache)
    stop with one line instead of training on different data.
    """
    data = on_local_rank_zero_first(lambda: load(cfg.data_dir, download=cfg.download), dist)
    data = subset(data, cfg.train_per_class, cfg.test_limit)
    stop_unless_all_ranks_agree(
        tensor_digest(
            [
                ("train_images", data.train_images),
                ("train_labels", data.train_labels),
                ("test_images", data.test_images),
                ("test_labels", data.test_labels),
            ]
        )[:16],
        f"the CIFAR-10 data in {cfg.data_dir} (its SHA-256)",
        dist,
    )
    return data


def build_model(cfg: Config, data: CifarData) -> torch.nn.Module:
    """The network ``cfg.arch`` names (AirNet's whitening layer fitted on training images), in
    channels-last memory format when ``cfg.channels_last``; unwrapped, on the CPU."""
    if cfg.arch == "resnet18":
        model = resnet18(data.num_classes, cfg.weights)
    else:
        model = AirNet(cfg.widths, cfg.depth, data.num_classes, cfg.residual)
        model.init_whitening(normalize(data.train_images[:5000]))
        for norm in model.modules():
            if isinstance(norm, BatchNorm):
                norm.across_ranks = cfg.world_size_invariant
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def build_optimizer(cfg: Config, model: torch.nn.Module, steps: int):
    """SGD/Nesterov (or ``Muon`` for AirNet's conv filters with ``--optimizer muon``, which
    orthogonalises in bf16 when the run computes in bf16, else in float32); the triangular
    schedule lr_start -> 1 (at `warmup`) -> lr_end scales every group's lr. ``model``: the
    unwrapped one (under FSDP its parameters are the shards), on its device."""
    triangle = triangular(steps, cfg.warmup, cfg.lr_start, cfg.lr_end)
    if not isinstance(model, AirNet):
        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
        )
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, triangle)
    biases = model.norm_biases()
    whiten_bias = [model.whiten.bias]
    special = {id(p) for p in biases + whiten_bias}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    muon = cfg.optimizer == "muon"
    filters = [p for p in others if muon and p.dim() == 4]  # the conv filters, for Muon
    others = [p for p in others if not (muon and p.dim() == 4)]
    groups = [
        dict(params=others),
        dict(params=biases, lr=cfg.lr * cfg.bias_lr_scale, weight_decay=cfg.weight_decay / cfg.bias_lr_scale),
        dict(params=whiten_bias),
    ]
    whiten_steps = cfg.whiten_bias_epochs * steps / cfg.epochs
    lambdas = [triangle, triangle, lambda s: triangle(s) if s < whiten_steps else 0.0]
    if muon:
        groups.append(dict(params=filters, lr=cfg.muon_lr, momentum=cfg.muon_momentum, muon=True))
        lambdas.append(triangle)
        bf16 = use_bf16(cfg, model.whiten.bias.device)
        optimizer = Muon(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, bf16=bf16)
    else:
        optimizer = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
        )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def make_loss(cfg: Config, data: CifarData) -> Callable[[torch.Tensor, tuple], torch.Tensor]:
    """The per-batch loss ``(logits, (images, labels, ...)) -> mean over the batch``:
    cross-entropy with ``--label-smoothing``, in float32 whatever the forward's precision."""
    return lambda logits, batch: F.cross_entropy(logits.float(), batch[1], label_smoothing=cfg.label_smoothing)


def build_training(cfg: Config, data: CifarData, dist: DistInfo) -> CifarTraining:
    """The seeded model (whitening fitted, wrapped for DDP or FSDP, compiled if asked), its
    optimizer and schedule, the batches (with each image's alternating flip), the loss, and
    Lookahead's average when ``--lookahead``."""
    seed_everything(cfg.seed)
    tensors = [data.train_images, data.train_labels]
    if cfg.alternating_flip and cfg.flip:  # sharded with the images: the same at any world size
        tensors.append(alternating_flips(len(data.train_labels), cfg.seed))
    batches = TrainBatches(tensors, cfg.batch_size, dist, seed=cfg.seed)
    whiten_started = time.perf_counter()
    model = build_model(cfg, data)  # AirNet's whitening is fitted here: timed, as airbench times it
    whiten_s = time.perf_counter() - whiten_started
    model = wrap_model(model, dist, cfg.strategy)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: find the fastest kernels once
    steps = cfg.epochs * len(batches)
    # After wrapping: under FSDP the optimizer must hold the parameter shards.
    optimizer, scheduler = build_optimizer(cfg, unwrap(model), steps)
    lookahead = Lookahead(unwrap(model), steps) if cfg.lookahead else None
    if cfg.compile:
        model = torch.compile(model)
    return CifarTraining(
        model,
        optimizer,
        scheduler,
        batches,
        make_loss(cfg, data),
        bf16=use_bf16(cfg, dist.device),
        lookahead=lookahead,
        whiten_s=whiten_s,
    )


def train_one_epoch(
    cfg: Config,
    training: CifarTraining,
    progress: EpochProgress,
    dist: DistInfo,
    stop: Callable[[], bool] | None = None,
) -> dict[str, float] | None:
    """One pass over the training set from ``progress.step``; loss and accuracy summed over
    ranks (exact), or None when ``stop()`` said so after a step (pre-emption: ``progress`` then
    holds the step and this rank's sums)."""
    model, batches, epoch, sums = training.model, training.batches, progress.epoch, progress.sums
    model.train()
    aug = Augment(cfg.translate, cfg.flip, cfg.cutout)
    # Augmentation draws from its own generator on the device, seeded per epoch and rank (per
    # epoch alone with --world-size-invariant, which draws for the global batch): resumable
    # exactly (mid-epoch, from the state a pre-emption checkpoint saved). With nothing to draw
    # (no augmentation) there is no generator.
    stream = 0 if cfg.world_size_invariant else dist.rank
    generator = (
        torch.Generator(dist.device).manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + stream)
        if aug.draws_random
        else None
    )
    if generator is not None and "_augment_rng" in sums:
        generator.set_state(sums["_augment_rng"])
    tally = EpochTally(progress, len(batches), dist)  # on the device: no host sync per step
    # With --alternating-flip the batches carry each image's even-epoch flip (a third tensor).
    for batch in progress_bar(
        batches.epoch(epoch, progress.step), dist, total=len(batches) - progress.step, desc=f"epoch {epoch + 1}"
    ):
        images, labels, *even_flips = batch
        share = (dist.rank, dist.world_size, batches.global_size(progress.step)) if cfg.world_size_invariant else None
        flips = even_flips[0] ^ bool(epoch % 2) if even_flips else None
        x = prepare_batch(images, cfg.channels_last, aug, generator, share, flips)
        with bf16_autocast(dist.device, training.bf16):
            logits = model(x)
        loss = training.loss(logits, batch)
        training.step(loss, progress.step)  # ranks' shares of the last batch may differ: global mean
        if training.lookahead is not None:
            training.lookahead.update(unwrap(model), training.scheduler.last_epoch)
        tally.add(loss, len(labels), correct=(logits.argmax(1) == labels).sum())
        if tally.stopped(stop):
            if generator is not None:  # the resumed epoch draws on from here
                progress.sums["_augment_rng"] = generator.get_state()
            return None
    totals = tally.totals()
    return {
        "train_loss": totals["loss"] / totals["n"],
        "train_accuracy": totals["correct"] / totals["n"],
        "train_images": int(totals["n"]),
    }


@torch.no_grad()
def evaluate(
    cfg: Config, model: torch.nn.Module, data: CifarData, dist: DistInfo, final: bool = False
) -> dict[str, Any]:
    """Test loss, accuracy, per-class accuracy and confusion matrix over every test image
    exactly once (any world size); ``final``: with flip test-time augmentation when ``--tta``."""
    model.eval()
    tta, bf16 = cfg.tta and final, use_bf16(cfg, dist.device)
    # Summed on the device: the host reads them once, after the last batch, not once a batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    confusion = torch.zeros(data.num_classes, data.num_classes, dtype=torch.int64, device=dist.device)
    for xb, yb in eval_batches([data.test_images, data.test_labels], cfg.eval_batch_size, dist):
        x = prepare_batch(xb, cfg.channels_last)
        with bf16_autocast(dist.device, bf16):
            logits = model(x).float()
            if tta:
                logits = (logits + model(x.flip(3)).float()) / 2
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
        confusion += confusion_matrix(logits.argmax(1), yb, data.num_classes)
    confusion = all_reduce_tensor(confusion, dist)
    loss = reduce_sums({"loss": loss_sum}, dist)["loss"]
    n = int(confusion.sum())
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1)).tolist()
    return {
        "test_accuracy": int(confusion.diag().sum()) / max(n, 1),
        "test_loss": loss / max(n, 1),
        "test_images": n,
        "tta": tta,
        "per_class_accuracy": dict(zip(data.classes, per_class)),
        "confusion_matrix": confusion,
    }


def evaluate_checkpoint(cfg: Config, state: dict[str, Any], dist: DistInfo) -> dict[str, Any]:
    """--eval-only (common/run.py): the saved weights on the test set. ``cfg`` is the saved
    run's Config with this command line's ``EVAL_OPTIONS`` (e.g. ``--no-tta``)."""
    data = build_data(cfg, dist, state)
    model = load_for_evaluation(build_model(cfg, data), state["model"], state, dist)
    result = evaluate(cfg, model, data, dist, final=True)
    get_logger("cifar", dist).info(
        "%s: test accuracy %.4f (%d images%s, %d process(es))",
        state["loaded_from"],
        result["test_accuracy"],
        result["test_images"],
        ", flip TTA" if cfg.tta else "",
        dist.world_size,
    )
    return result


def train(cfg: Config, dist: DistInfo) -> dict[str, Any]:
    """Train (or resume) and test; returns the summary, timed as airbench times a run."""
    wall_start = time.time()
    log = get_logger("cifar", dist)
    data = build_data(cfg, dist)
    data_s = time.time() - wall_start
    log.info(
        "data: %d train / %d test images, %d classes, from %s (%.1f s)",
        len(data.train_labels),
        len(data.test_labels),
        data.num_classes,
        data.source,
        data_s,
    )
    training = build_training(cfg, data, dist)
    model, steps_per_epoch = training.model, len(training.batches)
    if cfg.compile and dist.device.type == "cpu" and cfg.amp != "off":
        log.warning("--compile on CPU: running in fp32 (inductor's bf16 gradients are not finite)")
    meta = {
        "program": "cifar",
        "arch": cfg.arch
        if cfg.arch != "airnet"
        else f"airnet-{'-'.join(map(str, cfg.widths))}-d{cfg.depth}{'' if cfg.residual else '-plain'}",
    }
    # What airbench times: whitening, training steps and the evaluation that reaches the
    # target; not data loading, setup, the other evaluations or checkpoint writes.
    clock = RaceClock(dist.device, training.whiten_s, wall_start)
    keep: dict[str, Any] = {"timing": clock}
    if training.lookahead is not None:
        keep["lookahead"] = training.lookahead
    run = Run(cfg, dist, meta, training, keep=keep)
    log.info(
        "%s: world size %d on %s, bf16 %s, %d steps/epoch of %d images",
        meta["arch"],
        dist.world_size,
        dist.device,
        training.bf16,
        steps_per_epoch,
        cfg.batch_size,
    )

    eval_clock = DeviceClock(dist.device)
    train_s, trained, test = 0.0, 0, None
    for progress in run.epochs():
        t0 = time.time()
        with clock.timed():
            result = train_one_epoch(cfg, training, progress, dist, stop=run.stop_requested)
        if result is None:  # pre-empted: checkpoint the step reached, exit 75
            run.leave(progress)
        row = {"epoch": progress.epoch, **result}
        epoch_train_s = time.time() - t0
        train_s += epoch_train_s
        trained += row["train_images"]
        last = progress.epoch == cfg.epochs - 1
        if last and training.lookahead is not None:
            with clock.timed():
                training.lookahead.update(unwrap(model), training.scheduler.last_epoch, final=True)
        with eval_clock.timed():
            test = evaluate(cfg, model, data, dist, final=last)
        elapsed = clock.elapsed_s
        if cfg.target_accuracy and clock.time_to_target_s is None and test["test_accuracy"] >= cfg.target_accuracy:
            clock.time_to_target_s, clock.wall_to_target_s = clock.seconds + eval_clock.last_section, elapsed
        row.update(
            test_loss=test["test_loss"],
            test_accuracy=test["test_accuracy"],
            train_images_per_s=row["train_images"] / epoch_train_s,
            samples_per_s=row["train_images"] / epoch_train_s,
            epoch_s=time.time() - t0,
            elapsed_s=elapsed,
            lr=training.scheduler.get_last_lr()[0],
        )
        run.log_epoch(row)
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f | test loss %.4f acc %.4f%s | %.0f img/s, %.1f s elapsed",
            progress.epoch + 1,
            cfg.epochs,
            row["train_loss"],
            row["train_accuracy"],
            test["test_loss"],
            test["test_accuracy"],
            " (flip TTA)" if test["tta"] else "",
            row["train_images_per_s"],
            elapsed,
        )
        run.save(progress.epoch)

    final = test if test is not None else evaluate(cfg, model, data, dist, final=True)  # a finished run resumed
    wall_s = time.time() - wall_start
    summary = {
        **final,
        "classes": list(data.classes),
        "epochs_run": cfg.epochs - run.start_epoch,
        "wall_time_s": wall_s,
        "data_setup_s": data_s,
        "train_time_s": train_s,
        "images_per_s": trained / train_s if train_s else None,
        "samples_per_s": trained / train_s if train_s else None,
        "target_accuracy": cfg.target_accuracy,
        "time_to_target_s": clock.time_to_target_s,
        "wall_to_target_s": clock.wall_to_target_s,
        "timed_s": clock.seconds,
        "bf16": training.bf16,
        "parameters": sum(p.numel() for p in unwrap(model).parameters()),
        "memory_per_rank": memory_per_rank(model, training.optimizer),
        "checkpoint": run.loaded_from,
    }
    run.write_summary(summary)  # the results reach disk before any extra
    if dist.is_main:  # after the last collective: no rank waits on the plots
        optional_extra(
            "plots", lambda: plot_run(run.read_metrics(), final, data.classes, run.plots_dir, meta["arch"]), log
        )
    log.info(
        "test accuracy %.4f (%d images%s), wall %.1f s, %.0f train images/s -> %s",
        final["test_accuracy"],
        final["test_images"],
        ", flip TTA" if final["tta"] else "",
        wall_s,
        summary["images_per_s"] or 0,
        cfg.out_dir,
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    with distributed(cfg.device, cfg.dist_timeout) as dist:
        if cfg.eval_only:
            run_eval_only(cfg, dist, evaluate_checkpoint)
        else:
            train(cfg, dist)


if __name__ == "__main__":
    run_main(main)
