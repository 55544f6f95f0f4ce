"""Train a CIFAR-10 classifier (DDP or FSDP): the dataset on the device, augmentation on the batch.

Each epoch logs train and test loss/accuracy reduced exactly across ranks; the end writes the
test confusion matrix (all-reduced), per-class accuracy and images/second to summary.json, and
loss/accuracy curves and the confusion matrix to plots/.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from cifar.data import Augment, CifarData, alternating_flips, augment, load, normalize, subset
from cifar.model import AirNet, BatchNorm, bf16_autocast, resnet18, use_bf16
from cifar.optim import Lookahead, Muon, triangular
from cifar.plots import plot_run
from cifar.presets import PRESETS, resolve_preset
from common.checkpoint import config_dict, save_checkpoint, training_state
from common.preempt import EpochProgress, Preemption, progress_from
from common.cli import make_parser
from common.config import RunConfig
from common.data import TrainBatches, eval_batches
from common.dist import DistInfo, distributed, on_local_rank_zero_first, stop_unless_all_ranks_agree, tensor_digest
from common.errors import UserError, run_main
from common.finite import FiniteLossWatch
from common.evaluation import run_eval_only
from common.metrics import all_reduce_tensor, confusion_matrix, reduce_sums
from common.parallel import full_tensors, memory_per_rank, shard_like, unwrap, wrap_model
from common.report import RunRecorder, get_logger, optional_extra, progress
from common.resume import check_ranks_agree, resume_from
from common.rng import seed_everything
from common.rundir import claim_run_dir
from common.timing import DeviceClock

EXAMPLES = """examples:
  torchrun --nproc_per_node=2 cifar/train.py --data-dir ../shared/data --preset cpu
  torchrun --nproc_per_node=8 cifar/train.py --data-dir data --preset airbench94
  python cifar/train.py --device cpu --epochs 1
  python cifar/train.py --arch resnet18 --weights resnet18-f37072fd.pth --preset resnet18
"""

@dataclass(frozen=True, kw_only=True)
class Config(RunConfig):
    """The shared fields (common/config.py) and cifar's: recipe, model, augmentation, precision."""

    PROGRAM: ClassVar[str] = "cifar"
    # --eval-only takes these from its command line (how to evaluate), the rest from the checkpoint.
    EVAL_OPTIONS: ClassVar[tuple[str, ...]] = ("tta", "amp", "eval_batch_size", "test_limit", "download")
    # The preset's name (its settings are compared one by one), and what only evaluation uses.
    RESUME_OPTIONS: ClassVar[tuple[str, ...]] = ("preset", "target_accuracy", "tta", "eval_batch_size",
                                                 "test_limit", "download")

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
    optimizer: str = "sgd"  # "sgd", or "muon": Muon for the conv filters, SGD for the rest (airnet)
    muon_lr: float = 0.24  # Muon's step along the orthogonalised momentum (per schedule factor 1)
    muon_momentum: float = 0.6  # Muon's Nesterov momentum
    weight_decay: float  # L2 coefficient (biases of BatchNorm get weight_decay / bias_lr_scale)
    bias_lr_scale: float  # BatchNorm shifts learn this many times faster (airbench)
    whiten_bias_epochs: int  # epochs the whitening conv's bias trains before it is frozen
    label_smoothing: float  # 0 = off
    translate: int  # pixels, 0 = off
    flip: bool
    alternating_flip: bool = False  # each image flipped every other epoch (airbench), not at random
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
    world_size_invariant: bool = False

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
            (not self.world_size_invariant or self.arch == "airnet",
             "--world-size-invariant applies to --arch airnet only"),
            (self.optimizer == "sgd" or self.arch == "airnet", "--optimizer muon applies to --arch airnet only"),
            (self.muon_lr > 0, f"--muon-lr must be positive, got {self.muon_lr}"),
            (0 <= self.muon_momentum < 1, f"--muon-momentum must be in [0, 1), got {self.muon_momentum}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def parse_args(argv: list[str] | None = None) -> Config:
    parser = make_parser(__doc__ + "\n" + EXAMPLES, epochs=5, batch_size=512, lr=0.75,
                         data_dir="data", out_dir="runs/cifar",
                         eval_only="evaluate the --resume checkpoint on the test set, no training")
    p = parser.add_argument_group("cifar")
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS],
                   help="recipe defaults: auto = airbench94 on CUDA, cpu otherwise")
    p.add_argument("--arch", default="airnet", choices=["airnet", "resnet18"])
    p.add_argument("--widths", type=int, nargs=3, default=[64, 256, 256], metavar="C",
                   help="airnet: channels of the three conv groups")
    p.add_argument("--depth", type=int, default=2, help="airnet: convs per group")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True,
                   help="airnet: residual connections around each group's convs after the first "
                        "(--no-residual: plain, as airbench94)")
    p.add_argument("--weights", default=None,
                   help="resnet18: pretrained state_dict file, or 'none' for random init "
                        "(default: torchvision's cache, else download)")
    p.add_argument("--lr-start", type=float, default=0.2, help="triangular schedule start (x lr)")
    p.add_argument("--lr-end", type=float, default=0.07, help="triangular schedule end (x lr)")
    p.add_argument("--warmup", type=float, default=0.23, help="fraction of steps rising to lr")
    p.add_argument("--momentum", type=float, default=0.85, help="Nesterov momentum")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "muon"],
                   help="airnet: muon = Muon (orthogonalised momentum) for the conv filters and "
                        "SGD for the head and biases, as airbench94_muon; sgd = SGD for all")
    p.add_argument("--muon-lr", type=float, default=0.24, help="--optimizer muon: the filters' lr")
    p.add_argument("--muon-momentum", type=float, default=0.6,
                   help="--optimizer muon: the filters' Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=0.0153 / 11.5,
                   help="L2 coefficient (airbench's 0.0153 per 1024 images at lr 11.5)")
    p.add_argument("--bias-lr-scale", type=float, default=64.0,
                   help="airnet: BatchNorm shifts train this many times faster")
    p.add_argument("--whiten-bias-epochs", type=int, default=3,
                   help="airnet: epochs before the whitening bias is frozen")
    p.add_argument("--label-smoothing", type=float, default=0.2, help="0 = off")
    p.add_argument("--translate", type=int, default=2, help="random shift in pixels, 0 = off")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no random flips")
    p.add_argument("--alternating-flip", action=argparse.BooleanOptionalAction, default=False,
                   help="airbench's flips: a random half of the images in even epochs, the other "
                        "half in odd ones, instead of a coin per image and epoch")
    p.add_argument("--cutout", type=int, default=0, help="cutout square side in pixels, 0 = off")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="test-time flip augmentation")
    p.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=True,
                   help="airbench's Lookahead-EMA: every 5 steps pull the weights toward their "
                        "running average, more strongly late in training")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (on CPU this forces fp32, see use_bf16)")
    p.add_argument("--eval-batch-size", type=int, default=500, help="per rank")
    p.add_argument("--train-per-class", type=int, default=None, metavar="N")
    p.add_argument("--test-limit", type=int, default=None, metavar="N")
    p.add_argument("--target-accuracy", type=float, default=None, metavar="FRACTION")
    p.add_argument("--no-download", dest="download", action="store_false")
    p.add_argument("--world-size-invariant", action="store_true",
                   help="BatchNorm statistics and augmentation draws over the whole global batch "
                        "instead of each process's share: 1 or 8 processes then train alike (one "
                        "small all-reduce per BatchNorm layer and step)")
    known, _ = parser.parse_known_args(argv)
    preset = resolve_preset(known.preset, known.device)
    parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    return Config.from_args(args, preset=preset, widths=tuple(args.widths))


def build_data(cfg: Config, dist: DistInfo) -> CifarData:
    """Decode (or load the cache) on each node's local rank 0 while the others wait, then load.

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
    stop_unless_all_ranks_agree(tensor_digest([
        ("train_images", data.train_images), ("train_labels", data.train_labels),
        ("test_images", data.test_images), ("test_labels", data.test_labels)])[:16],
        f"the CIFAR-10 data in {cfg.data_dir} (its SHA-256)", dist)
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


def build_optimizer(cfg: Config, model: torch.nn.Module, steps: int, bf16: bool = True):
    """SGD/Nesterov (or ``Muon`` for AirNet's conv filters with ``--optimizer muon``, which
    orthogonalises in bf16 when the run computes in ``bf16``, else in float32); the triangular
    schedule lr_start -> 1 (at `warmup`) -> lr_end scales every group's lr."""
    triangle = triangular(steps, cfg.warmup, cfg.lr_start, cfg.lr_end)
    if not isinstance(model, AirNet):
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                    weight_decay=cfg.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, triangle)
    biases = model.norm_biases()
    whiten_bias = [model.whiten.bias]
    special = {id(p) for p in biases + whiten_bias}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    muon = cfg.optimizer == "muon"
    filters = [p for p in others if muon and p.dim() == 4]  # the conv filters, for Muon
    others = [p for p in others if not (muon and p.dim() == 4)]
    groups = [dict(params=others),
              dict(params=biases, lr=cfg.lr * cfg.bias_lr_scale,
                   weight_decay=cfg.weight_decay / cfg.bias_lr_scale),
              dict(params=whiten_bias)]
    whiten_steps = cfg.whiten_bias_epochs * steps / cfg.epochs
    lambdas = [triangle, triangle, lambda s: triangle(s) if s < whiten_steps else 0.0]
    if muon:
        groups.append(dict(params=filters, lr=cfg.muon_lr, momentum=cfg.muon_momentum, muon=True))
        lambdas.append(triangle)
        optimizer = Muon(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, bf16=bf16)
    else:
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                    weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def prepare_batch(images: torch.Tensor, cfg: Config, aug: Augment | None = None,
                  generator: torch.Generator | None = None, share: tuple[int, int, int] | None = None,
                  flips: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised (and augmented, with ``aug``; ``share`` and ``flips``: see ``augment``)
    images in the model's memory format."""
    x = normalize(images) if aug is None else augment(normalize(images), aug, generator, share, flips)
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def train_one_epoch(model, batches: TrainBatches, optimizer, scheduler, cfg: Config,
                    partial: EpochProgress, dist: DistInfo, bf16: bool, lookahead: Lookahead | None,
                    preempt: Preemption | None = None) -> dict[str, float] | None:
    """One pass over the training set from ``partial.step``; loss and accuracy summed over ranks
    (exact), or None when pre-empted (``partial`` then holds the step and this rank's sums)."""
    model.train()
    epoch, sums = partial.epoch, partial.sums
    aug = Augment(cfg.translate, cfg.flip, cfg.cutout)
    # Augmentation draws from its own generator on the device, seeded per epoch and rank (per
    # epoch alone with --world-size-invariant, which draws for the global batch): resumable
    # exactly (mid-epoch, from the state a pre-emption checkpoint saved). With nothing to draw
    # (no augmentation) there is no generator.
    stream = 0 if cfg.world_size_invariant else dist.rank
    generator = (torch.Generator(dist.device).manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + stream)
                 if aug.draws_random else None)
    if generator is not None and "_augment_rng" in sums:
        generator.set_state(sums["_augment_rng"])
    loss_sum = sums.get("loss", torch.zeros((), dtype=torch.float64)).to(dist.device)
    correct = sums.get("correct", torch.zeros((), dtype=torch.int64)).to(dist.device)
    seen = sums.get("n", 0)
    finite = FiniteLossWatch(dist)  # every step, no host sync; agreed at the epoch's end
    # With --alternating-flip the batches carry each image's even-epoch flip (a third tensor).
    for images, labels, *even_flips in progress(batches.epoch(epoch, partial.step), dist,
                                                total=len(batches) - partial.step, desc=f"epoch {epoch + 1}"):
        share = ((dist.rank, dist.world_size, batches.global_size(partial.step))
                 if cfg.world_size_invariant else None)
        flips = even_flips[0] ^ bool(epoch % 2) if even_flips else None
        x = prepare_batch(images, cfg, aug, generator, share, flips)
        with bf16_autocast(dist.device, bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        finite.update(loss, epoch * len(batches) + partial.step)
        optimizer.zero_grad(set_to_none=True)
        batches.global_mean(loss, partial.step).backward()  # ranks' shares of the last batch may differ
        optimizer.step()
        scheduler.step()
        if lookahead is not None:
            lookahead.update(unwrap(model), scheduler.last_epoch)
        loss_sum += loss.detach().double() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        partial.step += 1
        if preempt is not None and preempt.stop_requested():  # every rank, after the same step
            finite.check()
            partial.sums = {"loss": loss_sum, "correct": correct, "n": seen}
            if generator is not None:
                partial.sums["_augment_rng"] = generator.get_state()
            return None
    finite.check()
    totals = reduce_sums({"loss": loss_sum, "correct": correct, "n": seen}, dist)
    return {"train_loss": totals["loss"] / totals["n"], "train_accuracy": totals["correct"] / totals["n"],
            "train_images": int(totals["n"])}


@torch.no_grad()
def evaluate(model, data: CifarData, cfg: Config, dist: DistInfo, bf16: bool, tta: bool) -> dict:
    """Loss, accuracy and confusion matrix over every test image exactly once (any world size)."""
    model.eval()
    # Summed on the device: the host reads them once, after the last batch, not once a batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    confusion = torch.zeros(data.num_classes, data.num_classes, dtype=torch.int64, device=dist.device)
    for xb, yb in eval_batches([data.test_images, data.test_labels], cfg.eval_batch_size, dist):
        x = prepare_batch(xb, cfg)
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
    return {"test_loss": loss / max(n, 1), "test_accuracy": int(confusion.diag().sum()) / max(n, 1),
            "test_images": n, "per_class": per_class, "confusion": confusion}


def evaluate_checkpoint(cfg: Config, state: dict, dist: DistInfo) -> dict:
    """--eval-only (common/evaluation.py): the saved weights on the test set. ``cfg`` is the
    saved run's Config with this command line's ``EVAL_OPTIONS`` (e.g. ``--no-tta``)."""
    data = build_data(cfg, dist)
    model = build_model(cfg, data).to(dist.device)
    model.load_state_dict(state["model"])
    check_ranks_agree(state, model, dist)
    result = evaluate(model, data, cfg, dist, use_bf16(cfg, dist.device), cfg.tta)
    get_logger("cifar", dist).info(
        "%s: test accuracy %.4f (%d images%s, %d process(es))", state["loaded_from"],
        result["test_accuracy"], result["test_images"], ", flip TTA" if cfg.tta else "", dist.world_size)
    return test_report(result, data, cfg.tta)


def test_report(result: dict, data: CifarData, tta: bool) -> dict:
    """``evaluate``'s figures as summary.json and eval.json hold them."""
    return {"test_accuracy": result["test_accuracy"], "test_loss": result["test_loss"],
            "test_images": result["test_images"], "tta": tta,
            "per_class_accuracy": dict(zip(data.classes, result["per_class"])),
            "confusion_matrix": result["confusion"]}


def main() -> None:
    cfg = parse_args()
    wall_start = time.time()
    with distributed(cfg.device, cfg.dist_timeout) as dist:
        log = get_logger("cifar", dist)
        if cfg.eval_only:
            run_eval_only(cfg, dist, evaluate_checkpoint)
            return
        seed_everything(cfg.seed)
        data = build_data(cfg, dist)
        data_s = time.time() - wall_start
        log.info("data: %d train / %d test images, %d classes, from %s (%.1f s)",
                 len(data.train_labels), len(data.test_labels), data.num_classes, data.source, data_s)
        train_tensors = [data.train_images, data.train_labels]
        if cfg.alternating_flip and cfg.flip:  # sharded with the images: the same at any world size
            train_tensors.append(alternating_flips(len(data.train_labels), cfg.seed))
        batches = TrainBatches(train_tensors, cfg.batch_size, dist, seed=cfg.seed)
        steps_per_epoch = len(batches)

        whiten_started = time.perf_counter()
        model = build_model(cfg, data)  # AirNet's whitening is fitted here: timed, as airbench times it
        whiten_s = time.perf_counter() - whiten_started
        model = wrap_model(model, dist, cfg.strategy)
        if dist.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: find the fastest kernels once
        bf16 = use_bf16(cfg, dist.device)
        # After wrapping: under FSDP the optimizer must hold the parameter shards.
        optimizer, scheduler = build_optimizer(cfg, unwrap(model), cfg.epochs * steps_per_epoch, bf16)
        if cfg.compile:
            model = torch.compile(model)
        if cfg.compile and dist.device.type == "cpu" and cfg.amp != "off":
            log.warning("--compile on CPU: running in fp32 (inductor's bf16 gradients are not finite)")
        meta = {"program": "cifar", "arch": cfg.arch if cfg.arch != "airnet" else
                f"airnet-{'-'.join(map(str, cfg.widths))}-d{cfg.depth}{'' if cfg.residual else '-plain'}"}
        # The data is valid: now this launch becomes the one writer of --out-dir, or stops.
        claim_run_dir(cfg.out_dir, cfg.PROGRAM, dist, cfg.resume is not None, cfg.overwrite)
        state = resume_from(cfg.resume, cfg.out_dir, dist, meta, model, optimizer, scheduler, cfg)
        lookahead = Lookahead(unwrap(model), cfg.epochs * steps_per_epoch) if cfg.lookahead else None
        if lookahead is not None and state and state.get("lookahead") is not None:
            lookahead.average = shard_like(state["lookahead"], unwrap(model).state_dict())
        start_epoch = state["epoch"] + 1 if state else 0
        recorder = RunRecorder(cfg.out_dir, dist, start_epoch, tensorboard=cfg.tensorboard)
        log.info("%s: world size %d on %s, bf16 %s, %d steps/epoch of %d images",
                 meta["arch"], dist.world_size, dist.device, bf16, steps_per_epoch, cfg.batch_size)

        elapsed_before = state.get("elapsed_s", 0.0) if state else 0.0  # wall time of the runs before
        # What airbench times: whitening, training steps and the evaluation that reaches the
        # target; not data loading, setup, the other evaluations or checkpoint writes.
        clock = DeviceClock(dist.device, state.get("timed_s", 0.0) if state else whiten_s)
        eval_clock = DeviceClock(dist.device)
        time_to_target = state.get("time_to_target_s") if state else None
        wall_to_target = state.get("wall_to_target_s") if state else None
        train_s, trained, resumed, preempt = 0.0, 0, progress_from(state, dist), Preemption(dist)

        def checkpoint(epoch: int, elapsed: float, partial: EpochProgress | None = None) -> None:
            """``epoch`` is the last completed one; ``partial`` the one stopped inside."""
            save_checkpoint(cfg.out_dir, training_state(
                model, optimizer, epoch, meta, scheduler, config=config_dict(cfg),
                elapsed_s=elapsed, timed_s=clock.seconds, time_to_target_s=time_to_target,
                wall_to_target_s=wall_to_target,
                lookahead=full_tensors(lookahead.average) if lookahead is not None else None), dist,
                partial)

        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            partial = resumed if resumed is not None and resumed.epoch == epoch else EpochProgress(epoch)
            with clock.timed():
                result = train_one_epoch(model, batches, optimizer, scheduler, cfg, partial, dist, bf16,
                                         lookahead, preempt)
            if result is None:
                checkpoint(epoch - 1, elapsed_before + time.time() - wall_start, partial)
                preempt.leave(cfg.out_dir / "checkpoint.pt", partial, log.info)
            row = {"epoch": epoch, **result}
            epoch_train_s = time.time() - t0
            train_s += epoch_train_s
            trained += row["train_images"]
            last = epoch == cfg.epochs - 1
            if last and lookahead is not None:
                with clock.timed():
                    lookahead.update(unwrap(model), scheduler.last_epoch, final=True)
            with eval_clock.timed():
                test = evaluate(model, data, cfg, dist, bf16, tta=cfg.tta and last)
            elapsed = elapsed_before + time.time() - wall_start
            if cfg.target_accuracy and time_to_target is None and test["test_accuracy"] >= cfg.target_accuracy:
                time_to_target, wall_to_target = clock.seconds + eval_clock.last_section, elapsed
            row.update(test_loss=test["test_loss"], test_accuracy=test["test_accuracy"],
                       train_images_per_s=row["train_images"] / epoch_train_s,
                       samples_per_s=row["train_images"] / epoch_train_s, elapsed_s=elapsed,
                       lr=scheduler.get_last_lr()[0])
            recorder.log_epoch(row)
            log.info("epoch %d/%d  train loss %.4f acc %.4f | test loss %.4f acc %.4f%s | "
                     "%.0f img/s, %.1f s elapsed", epoch + 1, cfg.epochs, row["train_loss"],
                     row["train_accuracy"], test["test_loss"], test["test_accuracy"],
                     " (flip TTA)" if cfg.tta and last else "", row["train_images_per_s"], elapsed)
            checkpoint(epoch, elapsed)

        preempt.release()  # training is over: SIGTERM now stops the process at once
        final = evaluate(model, data, cfg, dist, bf16, cfg.tta) if start_epoch >= cfg.epochs else test
        wall_s = time.time() - wall_start
        summary = {
            **test_report(final, data, cfg.tta), "classes": list(data.classes), "epochs_run": cfg.epochs - start_epoch,
            "wall_time_s": wall_s, "data_setup_s": data_s, "train_time_s": train_s,
            "images_per_s": trained / train_s if train_s else None,
            "samples_per_s": trained / train_s if train_s else None,
            "target_accuracy": cfg.target_accuracy, "time_to_target_s": time_to_target,
            "wall_to_target_s": wall_to_target, "timed_s": clock.seconds,
            "bf16": bf16, "parameters": sum(p.numel() for p in unwrap(model).parameters()),
            "memory_per_rank": memory_per_rank(model, optimizer),
            "checkpoint": state.get("loaded_from") if state else None,
        }
        recorder.write_summary(summary, cfg)  # the results reach disk before any extra
        if dist.is_main:  # after the last collective: no rank waits on the plots
            optional_extra("plots", lambda: plot_run(recorder.read_metrics(), final, data.classes,
                                                     recorder.plots_dir, meta["arch"]), log)
        log.info("test accuracy %.4f (%d images%s), wall %.1f s, %.0f train images/s -> %s",
                 final["test_accuracy"], final["test_images"], ", flip TTA" if cfg.tta else "",
                 wall_s, summary["images_per_s"] or 0, cfg.out_dir)


if __name__ == "__main__":
    run_main(main)
