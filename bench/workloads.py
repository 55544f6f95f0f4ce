"""The benchmark's workloads: each program's real data, model, optimizer and loss.

Built by the programs' own ``parse_args`` / ``build_data`` / ``build_model`` / ``build_optimizer``
/ ``make_loss``, so the benchmark measures what the programs run; ``synthetic`` is a tiny MLP for the bench's tests.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.dist import DistInfo
from common.parallel import unwrap
from common.rng import seed_everything


@dataclass
class Workload:
    name: str
    tensors: list[torch.Tensor]  # training tensors, on the device, cut by TrainBatches
    global_batch: int  # samples per optimizer step over all ranks (the program's default)
    build_model: Callable[[], torch.nn.Module]  # fresh and seeded, on the CPU, unwrapped
    build_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
    inputs: Callable[[tuple, torch.Generator], tuple[torch.Tensor, tuple]]  # data-side work: (x, batch)
    loss: Callable[[torch.Tensor, tuple], torch.Tensor]  # (output, batch) -> mean over this rank's batch
    bf16: bool  # forward under bf16 autocast, as the program does
    describe: str
    setup_s: float = 0.0  # seconds to build the data (not part of any step)


def _housing(args: argparse.Namespace, dist: DistInfo, scratch: Path) -> Workload:
    from housing import train as h

    cfg = h.parse_args(["--data-dir", str(args.data_dir), "--device", args.device, "--out-dir", str(scratch)])
    data = h.build_data(cfg, dist)
    n_features = data.train.x.shape[1]

    def build_model() -> torch.nn.Module:
        seed_everything(cfg.seed)
        return h.build_model(cfg, data)

    return Workload(
        "housing",
        [data.train.x.to(dist.device), data.train.y.to(dist.device)],
        cfg.batch_size,
        build_model,
        lambda m: h.build_optimizer(cfg, m, 10_000)[0],
        lambda batch, g: (batch[0], batch),
        h.make_loss(cfg, data),
        False,
        f"MLP {cfg.arch}, {n_features} features, {len(data.train.y)} training rows, AdamW",
    )


def _cifar(args: argparse.Namespace, dist: DistInfo, scratch: Path) -> Workload:
    from cifar import train as c
    from cifar.data import Augment, augment, normalize

    cfg = c.parse_args(
        ["--data-dir", str(args.data_dir), "--device", args.device, "--out-dir", str(scratch), "--no-download"]
    )
    data = c.build_data(cfg, dist)
    aug = Augment(cfg.translate, cfg.flip, cfg.cutout)

    def build_model() -> torch.nn.Module:
        seed_everything(cfg.seed)
        return c.build_model(cfg, data)  # channels-last when the program's is

    def inputs(batch: tuple, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = augment(normalize(batch[0]), aug, generator)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, batch

    n_params = sum(p.numel() for p in build_model().parameters())
    return Workload(
        "cifar",
        [data.train_images.to(dist.device), data.train_labels.to(dist.device)],
        cfg.batch_size,
        build_model,
        lambda m: c.build_optimizer(cfg, unwrap(m), 10_000)[0],
        inputs,
        c.make_loss(cfg, data),
        c.use_bf16(cfg, dist.device),
        f"{cfg.arch} {'-'.join(map(str, cfg.widths))} d{cfg.depth} (preset {cfg.preset}, "
        f"{n_params / 1e6:.2f} M parameters), {len(data.train_labels)} training images, "
        f"SGD-Nesterov, channels_last {cfg.channels_last}",
    )


def _anomaly(args: argparse.Namespace, dist: DistInfo, scratch: Path) -> Workload:
    from anomaly import train as a

    cfg = a.parse_args(["--data-dir", str(args.data_dir), "--device", args.device, "--out-dir", str(scratch)])
    data = a.build_data(cfg, dist)
    x, y = data.training_rows(cfg.detector)

    def build_model() -> torch.nn.Module:
        seed_everything(cfg.seed)
        return a.build_model(cfg, data)

    return Workload(
        "anomaly",
        [x.to(dist.device), y.to(dist.device)],
        cfg.batch_size,
        build_model,
        lambda m: a.build_optimizer(cfg, m, 10_000)[0],
        lambda batch, g: (batch[0], batch),
        a.make_loss(cfg, data),
        False,
        f"{cfg.detector} (autoencoder {'-'.join(map(str, cfg.hidden))}, classifier "
        f"{'-'.join(map(str, cfg.classifier_hidden))}) on {x.shape[1]} features, "
        f"{len(x)} training rows, AdamW",
    )


def _synthetic(args: argparse.Namespace, dist: DistInfo, scratch: Path) -> Workload:
    """A tiny MLP on random data: for the bench's own tests (no dataset needed)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g)
    y = x @ torch.linspace(-1, 1, 16) + 0.1 * torch.randn(2048, generator=g)

    def build_model() -> torch.nn.Module:
        seed_everything(0)
        return torch.nn.Sequential(
            torch.nn.Linear(16, 64),
            torch.nn.ReLU(),
            torch.nn.Linear(64, 64),
            torch.nn.ReLU(),
            torch.nn.Linear(64, 1),
            torch.nn.Flatten(0),
        )

    return Workload(
        "synthetic",
        [x.to(dist.device), y.to(dist.device)],
        256,
        build_model,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
        lambda batch, g: (batch[0], batch),
        lambda out, batch: F.mse_loss(out, batch[1]),
        False,
        "MLP 16-64-64-1 on 2048 random rows, AdamW",
    )


WORKLOADS = {"housing": _housing, "cifar": _cifar, "anomaly": _anomaly, "synthetic": _synthetic}
