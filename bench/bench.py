"""Benchmark housing, cifar and anomaly: throughput, scaling, where a step's time goes, memory.

One command measures every program at world size 1 and 2 (it launches ``python`` and
``torchrun`` itself, one fresh process group per program and world size, so peak memory is per
program) and writes ``<out>/benchmarks.md`` and ``<out>/benchmarks.json``:

  python bench/bench.py --data-dir ../shared/data --out docs/
  python bench/bench.py --data-dir data --device cuda --out docs/   # GPUs, NCCL: benchmarks-cuda.*

What is measured, per program, on its real model, optimizer and data (built by the program's own
``parse_args`` / ``build_data`` / ``build_model``), after a fixed number of warm-up steps:

- a step = get the batch (indexing the in-memory tensors, plus CIFAR's on-device augmentation),
  forward + backward, optimizer step; each part is timed separately;
- communication = (forward + backward of normal DDP steps) - (forward + backward of steps run
  inside ``DistributedDataParallel.no_sync()``, which skips the gradient all-reduce). The two
  kinds of step alternate, so both see the same machine conditions. This is the *exposed* cost of
  the all-reduce (the part not hidden behind backward), including any wait for a slower rank;
- samples/s per process = per-rank batch / mean step time; scaling efficiency =
  total samples/s at world size N / (N x total samples/s at world size 1), with the same *global*
  batch (the programs' default), so perfect scaling halves the step time on 2 processes;
- peak memory = ``ru_maxrss`` of each rank (CPU; whole process, data included) or
  ``torch.cuda.max_memory_allocated`` (GPU), the largest over ranks;
- at world size > 1, bytes of parameters + gradients + optimizer state per rank with
  ``--strategy ddp`` and ``fsdp`` (``common.parallel.memory_per_rank`` after one optimizer step);
- CIFAR only: images/s delivered to the model by the project's path (uint8 tensor cache +
  on-device batch augmentation) and by torchvision's ImageFolder + DataLoader + PIL transforms
  on the same JPEG files, in the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from common.data import TrainBatches
from common.dist import DistInfo, distributed
from common.errors import UserError, run_main
from common.metrics import gather_tensors
from common.parallel import memory_per_rank, unwrap, wrap_model
from common.report import git_commit, write_json_atomic
from common.rng import seed_everything

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("housing", "cifar", "anomaly")
TABLES = ("throughput", "memory", "pipeline")
# Timed steps per program: each kind (normal / no_sync) runs this many. The small tabular
# models take milliseconds per step, so they get more steps for the same timing noise.
DEFAULT_STEPS = {"housing": 100, "cifar": 20, "anomaly": 100, "synthetic": 20}
DEFAULT_WARMUP = {"housing": 10, "cifar": 3, "anomaly": 10, "synthetic": 3}
PIPELINE_PER_CLASS = 512  # CIFAR training images per class in the data-path comparison
EXAMPLE = """examples:
  python bench/bench.py --data-dir ../shared/data --out docs/
  python bench/bench.py --data-dir ../shared/data --programs housing --steps 20 --out /tmp/bench
  python bench/bench.py --data-dir data --device cuda --out docs/      # needs 2 GPUs for world size 2
"""


# ---------------------------------------------------------------------------------------------
# Workloads: each program's real data, model, optimizer and loss
# ---------------------------------------------------------------------------------------------

@dataclass
class Workload:
    name: str
    tensors: list[torch.Tensor]  # training tensors, on the device, cut by TrainBatches
    global_batch: int  # samples per optimizer step over all ranks (the program's default)
    build_model: Callable[[], torch.nn.Module]  # fresh and seeded, on the CPU, unwrapped
    build_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
    inputs: Callable[[tuple, torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # data-side work
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # mean over this rank's batch
    bf16: bool  # forward under bf16 autocast, as the program does
    describe: str
    setup_s: float = 0.0  # seconds to build the data (not part of any step)


def _housing(args: argparse.Namespace, dist: DistInfo, scratch: Path) -> Workload:
    from housing import train as h

    cfg = h.parse_args(["--data-dir", str(args.data_dir), "--device", args.device,
                        "--out-dir", str(scratch)])
    data = h.build_data(cfg, dist)
    n_features = data.train.x.shape[1]

    def build_model() -> torch.nn.Module:
        seed_everything(cfg.seed)
        return h.build_model(cfg, n_features, data.train.x)

    return Workload(
        "housing", [data.train.x.to(dist.device), data.train.y.to(dist.device)], cfg.batch_size,
        build_model, lambda m: h.build_optimizer(cfg, m, 10_000)[0],
        lambda batch, g: (batch[0], batch[1]), h.loss_fn, False,
        f"MLP {cfg.arch}, {n_features} features, {len(data.train.y)} training rows, AdamW")


def _cifar(args: argparse.Namespace, dist: DistInfo, scratch: Path) -> Workload:
    from cifar import train as c
    from cifar.data import Augment, augment, normalize

    cfg = c.parse_args(["--data-dir", str(args.data_dir), "--device", args.device,
                        "--out-dir", str(scratch), "--no-download"])
    data = c.build_data(cfg, dist)
    aug = Augment(cfg.translate, cfg.flip, cfg.cutout)

    def build_model() -> torch.nn.Module:
        seed_everything(cfg.seed)
        model = c.build_model(cfg, data)
        return model.to(memory_format=torch.channels_last) if cfg.channels_last else model

    def inputs(batch: tuple, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = augment(normalize(batch[0]), aug, generator)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, batch[1]

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)

    n_params = sum(p.numel() for p in build_model().parameters())
    return Workload(
        "cifar", [data.train_images.to(dist.device), data.train_labels.to(dist.device)],
        cfg.batch_size, build_model, lambda m: c.build_optimizer(cfg, unwrap(m), 10_000)[0],
        inputs, loss, c.use_bf16(cfg, dist.device),
        f"{cfg.arch} {'-'.join(map(str, cfg.widths))} d{cfg.depth} (preset {cfg.preset}, "
        f"{n_params / 1e6:.2f} M parameters), {len(data.train_labels)} training images, "
        f"SGD-Nesterov, channels_last {cfg.channels_last}")


def _anomaly(args: argparse.Namespace, dist: DistInfo, scratch: Path) -> Workload:
    from anomaly import train as a

    cfg = a.parse_args(["--data-dir", str(args.data_dir), "--device", args.device,
                        "--out-dir", str(scratch)])
    data = a.build_data(cfg)
    x, y = data.training_rows(cfg.detector)
    normal_share = len(data.x["train_normal"]) / len(data.x["train"])

    def build_model() -> torch.nn.Module:
        seed_everything(cfg.seed)
        return a.build_model(cfg, data.transform)

    return Workload(
        "anomaly", [x.to(dist.device), y.to(dist.device)], cfg.batch_size, build_model,
        lambda m: torch.optim.AdamW(m.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    foreach=True),  # as train.py does
        lambda batch, g: (batch[0], batch),
        lambda out, batch: a.training_loss(cfg.detector, out, batch[0], batch[1], normal_share), False,
        f"{cfg.detector} (autoencoder {'-'.join(map(str, cfg.hidden))}, classifier "
        f"{'-'.join(map(str, cfg.classifier_hidden))}) on {x.shape[1]} features, "
        f"{len(x)} training rows, AdamW")


def _synthetic(args: argparse.Namespace, dist: DistInfo, scratch: Path) -> Workload:
    """A tiny MLP on random data: for the bench's own tests (no dataset needed)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g)
    y = x @ torch.linspace(-1, 1, 16) + 0.1 * torch.randn(2048, generator=g)

    def build_model() -> torch.nn.Module:
        seed_everything(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                   torch.nn.ReLU(), torch.nn.Linear(64, 1), torch.nn.Flatten(0))

    return Workload("synthetic", [x.to(dist.device), y.to(dist.device)], 256, build_model,
                    lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
                    lambda batch, g: (batch[0], batch[1]), F.mse_loss, False,
                    "MLP 16-64-64-1 on 2048 random rows, AdamW")


WORKLOADS = {"housing": _housing, "cifar": _cifar, "anomaly": _anomaly, "synthetic": _synthetic}


# ---------------------------------------------------------------------------------------------
# Measuring (worker side: runs on every rank)
# ---------------------------------------------------------------------------------------------

def _clock(device: torch.device) -> float:
    """Seconds, after the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _endless(batches: TrainBatches):
    epoch = 0
    while True:
        yield from batches.epoch(epoch)
        epoch += 1


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated CUDA memory, or the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def time_steps(wl: Workload, dist: DistInfo, warmup: int, steps: int) -> dict:
    """Mean seconds per step of each part, for normal steps and for ``no_sync`` steps.

    Steps alternate normal / no_sync (``warmup`` and ``steps`` of each), so slow drifts of the
    machine hit both equally. Without a process group there is no all-reduce: both kinds are
    normal steps and communication comes out as ~0.
    """
    model = wrap_model(wl.build_model(), dist)
    optimizer = wl.build_optimizer(model)
    batches = TrainBatches(wl.tensors, wl.global_batch, dist, seed=0)
    stream = _endless(batches)
    generator = torch.Generator(dist.device).manual_seed(1000 + dist.rank)
    sums = {kind: {"data": 0.0, "fwd_bwd": 0.0, "optimizer": 0.0} for kind in ("sync", "no_sync")}
    model.train()
    for i in range(2 * (warmup + steps)):
        if i == 2 * warmup:
            wall0, cpu0 = time.perf_counter(), _cpu_seconds()
        kind = "sync" if i % 2 == 0 else "no_sync"
        skip = model.no_sync() if kind == "no_sync" and isinstance(model, DistributedDataParallel) \
            else contextlib.nullcontext()
        t0 = _clock(dist.device)
        x, target = wl.inputs(next(stream), generator)
        t1 = _clock(dist.device)
        with skip:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=wl.bf16):
                out = model(x)
            loss = wl.loss(out, target)
            loss.backward()  # DDP returns only once the gradient all-reduce has finished
        t2 = _clock(dist.device)
        optimizer.step()
        t3 = _clock(dist.device)
        if i >= 2 * warmup:
            part = sums[kind]
            part["data"] += t1 - t0
            part["fwd_bwd"] += t2 - t1
            part["optimizer"] += t3 - t2
    # Share of the cores this process really got: well below 1 means other programs competed.
    cpu_share = (_cpu_seconds() - cpu0) / ((time.perf_counter() - wall0) * torch.get_num_threads())
    if not torch.isfinite(loss.detach()).item():
        raise UserError(f"{wl.name}: the loss became {loss.item()} during the benchmark")
    return {**{kind: {k: v / steps for k, v in parts.items()} for kind, parts in sums.items()},
            "cpu_share": cpu_share}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def strategy_memory(wl: Workload, dist: DistInfo) -> dict:
    """Per-rank bytes of parameters, gradients and optimizer state after one step, ddp vs fsdp."""
    batches = TrainBatches(wl.tensors, wl.global_batch, dist, seed=0)
    batch = next(iter(batches.epoch(0)))
    result = {}
    for strategy in ("ddp", "fsdp"):
        model = wrap_model(wl.build_model(), dist, strategy)
        optimizer = wl.build_optimizer(model)  # after wrapping: FSDP replaces the parameters
        x, target = wl.inputs(batch, torch.Generator(dist.device).manual_seed(0))
        with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=wl.bf16):
            out = model(x)
        wl.loss(out, target).backward()
        optimizer.step()
        local = memory_per_rank(model, optimizer)
        keys = ["param_bytes", "grad_bytes", "optimizer_bytes", "total_bytes"]
        per_rank = gather_tensors(torch.tensor([[float(local[k]) for k in keys]]), dist)
        result[strategy] = {"per_rank": [dict(zip(keys, map(int, row))) for row in per_rank.tolist()],
                            **{k: int(per_rank[:, j].max()) for j, k in enumerate(keys)}}
        del model, optimizer
    result["fsdp_over_ddp"] = result["fsdp"]["total_bytes"] / result["ddp"]["total_bytes"]
    return result


def worker_program(args: argparse.Namespace) -> None:
    """One program at one world size (launched by ``main`` with python or torchrun)."""
    with distributed(args.device) as dist, tempfile.TemporaryDirectory() as scratch:
        t0 = time.perf_counter()
        wl = WORKLOADS[args.program](args, dist, Path(scratch))
        wl.setup_s = time.perf_counter() - t0
        steps = args.steps or DEFAULT_STEPS[args.program]
        warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP[args.program]
        parts = time_steps(wl, dist, warmup, steps)
        peak = peak_memory_bytes(dist.device)
        row = [parts["sync"]["data"], parts["sync"]["fwd_bwd"], parts["sync"]["optimizer"],
               parts["no_sync"]["data"], parts["no_sync"]["fwd_bwd"], parts["no_sync"]["optimizer"],
               float(peak), parts["cpu_share"]]
        ranks = gather_tensors(torch.tensor([row], dtype=torch.float64), dist)
        # After the peak was read, so the extra models do not count in it.
        memory = strategy_memory(wl, dist) if args.with_memory and dist.is_distributed else None
        if dist.is_main:
            write_json_atomic(args.result, {
                "program": wl.name, "describe": wl.describe, "world_size": dist.world_size,
                "device": dist.device.type, "device_name": _device_name(dist.device),
                "threads_per_process": torch.get_num_threads(), "global_batch": wl.global_batch,
                "per_rank_batch": wl.global_batch // dist.world_size, "bf16": wl.bf16,
                "warmup_steps": warmup, "timed_steps": steps, "data_setup_s": wl.setup_s,
                **summarize(ranks.tolist(), wl.global_batch, dist.world_size),
                "strategy_memory": memory})


def worker_memory(args: argparse.Namespace) -> None:
    """The ddp-vs-fsdp per-rank bytes of one program (launched with world size > 1)."""
    with distributed(args.device) as dist, tempfile.TemporaryDirectory() as scratch:
        if not dist.is_distributed:
            raise UserError("the ddp-vs-fsdp memory comparison needs world size > 1")
        wl = WORKLOADS[args.program](args, dist, Path(scratch))
        memory = strategy_memory(wl, dist)
        if dist.is_main:
            write_json_atomic(args.result, {"program": wl.name, "describe": wl.describe,
                                            "world_size": dist.world_size, **memory})


def summarize(ranks: list[list[float]], global_batch: int, world_size: int) -> dict:
    """Turn per-rank mean step parts into the table's figures (means over ranks).

    A rank's row: data, fwd+bwd, optimizer seconds of normal steps, the same of no_sync steps,
    peak memory bytes, CPU share.

    comm = forward+backward of normal steps - that of no_sync steps (clamped at 0: noise can
    make it slightly negative when there is nothing to hide); fwd_bwd excludes comm.
    """
    n = len(ranks)
    mean = [sum(r[j] for r in ranks) / n for j in range(6)]
    data, fb_sync, opt, _, fb_nosync, _ = mean
    comm = max(0.0, fb_sync - fb_nosync)
    parts = {"data_s": data, "fwd_bwd_s": fb_sync - comm, "optimizer_s": opt, "comm_s": comm}
    step = sum(parts.values())
    per_process = global_batch / world_size / step
    return {
        "step_s": step, **parts,
        "shares": {k.removesuffix("_s"): v / step for k, v in parts.items()},
        "comm_raw_s": fb_sync - fb_nosync, "no_sync_step_s": mean[3] + fb_nosync + mean[5],
        "samples_per_s_per_process": per_process, "samples_per_s_total": per_process * world_size,
        "peak_memory_bytes": int(max(r[6] for r in ranks)),
        "cpu_share": min(r[7] for r in ranks),
        "per_rank": [{"data_s": r[0], "fwd_bwd_sync_s": r[1], "optimizer_s": r[2],
                      "fwd_bwd_no_sync_s": r[4], "peak_memory_bytes": int(r[6]),
                      "cpu_share": r[7]} for r in ranks],
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# CIFAR data paths: tensor cache + on-device augmentation vs ImageFolder + DataLoader + PIL
# ---------------------------------------------------------------------------------------------

def extract_jpeg_subset(archive: Path, target: Path, per_class: int) -> int:
    """Write the first ``per_class`` training JPEGs of each class (by file name) to ``target``.

    The project's cache orders each class by file name too, so ``cifar.data.subset`` picks the
    very same images. Returns the number of files written.
    """
    members: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(archive, "r|*") as tf:
        for member in tf:
            parts = member.name.split("/")
            if member.isfile() and len(parts) >= 3 and parts[-3] == "train" \
                    and parts[-1].lower().endswith((".jpg", ".jpeg", ".png")):
                members.setdefault(parts[-2], []).append((member.name, tf.extractfile(member).read()))
    if not members:
        raise UserError(f"{archive}: no train/<class>/*.jpg images; expected CIFAR-10 as JPEG "
                        "files in class folders (e.g. cifar10-jpg.tar.gz)")
    written = 0
    for cls, files in members.items():
        (target / cls).mkdir(parents=True)
        for name, raw in sorted(files)[:per_class]:
            (target / cls / Path(name).name).write_bytes(raw)
            written += 1
    return written


def _rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("nan")


def worker_pipeline(args: argparse.Namespace) -> None:
    """Images/s delivered to the model by both data paths, on the same images, one process."""
    from torchvision import datasets, transforms

    from cifar import train as c
    from cifar.data import MEAN, STD, Augment, augment, normalize, subset

    archive = Path(args.data_dir) / "cifar10-jpg.tar.gz"
    if not archive.is_file():
        raise UserError(f"{archive}: missing; the data-path comparison needs the CIFAR-10 JPEG "
                        "archive (cifar10-jpg/{train,test}/<class>/NNNN.jpg)")
    epochs = args.pipeline_epochs
    with distributed(args.device) as dist, tempfile.TemporaryDirectory() as scratch:
        batch = 512
        # Same augmentation strength on both paths: shift by up to 4 pixels and flip.
        aug = Augment(translate=4, flip=True, cutout=0)
        # The project's path: the decoded uint8 cache (built once per dataset, then loaded).
        cfg = c.parse_args(["--data-dir", str(args.data_dir), "--device", args.device,
                            "--out-dir", str(Path(scratch) / "run"), "--no-download"])
        t0 = time.perf_counter()
        data = subset(c.build_data(cfg, dist), PIPELINE_PER_CLASS, 1)
        images, labels = data.train_images.to(dist.device), data.train_labels.to(dist.device)
        load_s = time.perf_counter() - t0
        n = len(labels)
        batches = TrainBatches([images, labels], batch, dist, seed=0)
        generator = torch.Generator(dist.device).manual_seed(0)

        def project_epoch(epoch: int) -> int:
            delivered = 0
            for xb, yb in batches.epoch(epoch):
                x = augment(normalize(xb), aug, generator).contiguous(memory_format=torch.channels_last)
                delivered += len(x)
            _clock(dist.device)
            return delivered

        project_epoch(0)  # warm-up
        t0 = _clock(dist.device)
        delivered = sum(project_epoch(e) for e in range(1, epochs + 1))
        project = {"pipeline": "project: uint8 tensor cache + on-device batch augmentation",
                   "workers": 0, "images": delivered, "seconds": time.perf_counter() - t0}
        project["images_per_s"] = _rate(delivered, project["seconds"])

        # torchvision's usual path on the same JPEG files.
        folder = Path(scratch) / "train"
        t0 = time.perf_counter()
        written = extract_jpeg_subset(archive, folder, PIPELINE_PER_CLASS)
        extract_s = time.perf_counter() - t0
        if written != n:
            raise UserError(f"{archive}: extracted {written} images but the cache subset has {n}")
        transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
        dataset = datasets.ImageFolder(str(folder), transform=transform)
        baselines = []
        for workers in args.loader_workers:
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch, shuffle=True, drop_last=False, num_workers=workers,
                persistent_workers=workers > 0, pin_memory=dist.device.type == "cuda")

            def loader_epoch() -> int:
                delivered = 0
                for xb, yb in loader:
                    x = xb.to(dist.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    delivered += len(x)
                _clock(dist.device)
                return delivered

            loader_epoch()  # warm-up: starts the workers, fills the page cache
            t0 = _clock(dist.device)
            delivered = sum(loader_epoch() for _ in range(epochs))
            seconds = time.perf_counter() - t0
            baselines.append({"pipeline": "torchvision: ImageFolder + DataLoader + PIL transforms",
                              "workers": workers, "images": delivered, "seconds": seconds,
                              "images_per_s": _rate(delivered, seconds)})
            del loader
        best = max(baselines, key=lambda b: b["images_per_s"])
        write_json_atomic(args.result, {
            "device": dist.device.type, "device_name": _device_name(dist.device),
            "threads_per_process": torch.get_num_threads(), "images": n, "batch": batch,
            "timed_epochs": epochs, "cache_load_s": load_s, "jpeg_extract_s": extract_s,
            "project": project, "torchvision": baselines,
            "ratio_vs_best_torchvision": project["images_per_s"] / best["images_per_s"]})


# ---------------------------------------------------------------------------------------------
# Orchestration: launch the workers, collect, write the tables
# ---------------------------------------------------------------------------------------------

def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker_args: list[str], nproc: int, timeout_s: float) -> dict:
    """Run this file as a worker with ``nproc`` processes; return rank 0's JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        script = [str(Path(__file__).resolve()), *worker_args, "--result", str(result)]
        if nproc == 1:
            cmd = [sys.executable, *script]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", *script]
        try:
            done = subprocess.run(cmd, cwd=REPO, env=_child_env(), capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(f"bench worker {' '.join(worker_args)} (x{nproc}) ran past "
                            f"{timeout_s:.0f} s; use fewer --steps") from None
        if done.returncode != 0 or not result.is_file():
            lines = (done.stderr + done.stdout).splitlines()
            # The workers' own messages, not torchrun's summary of them.
            causes = [ln for ln in lines if re.match(r"^(\[rank \d+\] )?error: |^\w+(Error|Exception)\b", ln)
                      and "ChildFailedError" not in ln]
            tail = "\n".join(dict.fromkeys(causes)) or "\n".join(lines[-15:])
            raise UserError(f"bench worker {' '.join(worker_args)} (x{nproc}) failed with exit "
                            f"code {done.returncode}:\n{tail}")
        return json.loads(result.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] + "\n\n" + EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="folder with housing.csv, UNSW_NB15_*.csv(.zip), cifar10-jpg.tar.gz")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for benchmarks.md and benchmarks.json (benchmarks-cuda.* on "
                             "--device cuda); default: print only")
    parser.add_argument("--programs", default=",".join(PROGRAMS),
                        help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--world-sizes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu = gloo; cuda = NCCL, one GPU per process")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps of each kind (default per program: {DEFAULT_STEPS})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"warm-up steps of each kind (default per program: {DEFAULT_WARMUP})")
    parser.add_argument("--tables", default=",".join(TABLES),
                        help="which tables: throughput (per program and world size), memory "
                             "(ddp vs fsdp at the largest world size), pipeline (cifar data paths)")
    parser.add_argument("--pipeline-epochs", type=int, default=2,
                        help="timed passes over the comparison images per data path")
    parser.add_argument("--loader-workers", type=lambda s: [int(v) for v in s.split(",")],
                        default=[0, 2], help="DataLoader num_workers values to try (best counts)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per worker launch")
    # Internal: how main() starts the measuring processes.
    parser.add_argument("--worker", choices=["program", "memory", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--program", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    parser.add_argument("--with-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.program_list = [p.strip() for p in args.programs.split(",") if p.strip()]
    unknown = set(args.program_list) - set(WORKLOADS)
    if unknown or not args.program_list:
        raise UserError(f"--programs: unknown or empty ({', '.join(sorted(unknown))}); "
                        f"choose from {', '.join(WORKLOADS)}")
    args.table_list = [t.strip() for t in args.tables.split(",") if t.strip()]
    if set(args.table_list) - set(TABLES) or not args.table_list:
        raise UserError(f"--tables {args.tables!r}: choose from {', '.join(TABLES)}")
    try:
        args.world_size_list = sorted({int(w) for w in args.world_sizes.split(",")})
    except ValueError:
        raise UserError(f"--world-sizes {args.world_sizes!r}: expected integers like 1,2") from None
    if min(args.world_size_list) < 1:
        raise UserError("--world-sizes must be positive")
    for name in ("steps", "warmup"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "steps" else 0):
            raise UserError(f"--{name} must be {'positive' if name == 'steps' else '>= 0'}, got {value}")
    if args.pipeline_epochs < 1 or min(args.loader_workers) < 0:
        raise UserError("--pipeline-epochs must be >= 1 and --loader-workers >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return args


def run_all(args: argparse.Namespace) -> dict:
    """Every (program, world size) launch, the memory table and the data-path comparison."""
    shared = ["--data-dir", str(args.data_dir), "--device", args.device]
    if args.steps is not None:
        shared += ["--steps", str(args.steps)]
    if args.warmup is not None:
        shared += ["--warmup", str(args.warmup)]
    results: dict = {"programs": {}, "memory": {}, "pipeline": None}
    memory_ws = max(args.world_size_list)
    want_memory = "memory" in args.table_list and memory_ws > 1
    for program in args.program_list if "throughput" in args.table_list else []:
        runs = {}
        for ws in args.world_size_list:
            print(f"bench: {program} at world size {ws} ...", file=sys.stderr, flush=True)
            # The largest world size also does the ddp-vs-fsdp memory table (one launch fewer).
            extra = ["--with-memory"] if want_memory and ws == memory_ws else []
            runs[str(ws)] = launch(["--worker", "program", "--program", program, *shared, *extra],
                                   ws, args.timeout)
            memory = runs[str(ws)].pop("strategy_memory")
            if memory is not None:
                results["memory"][program] = {"program": program, "describe": runs[str(ws)]["describe"],
                                              "world_size": ws, **memory}
        base = runs.get("1")
        for ws, run in runs.items():
            run["scaling_efficiency"] = (run["samples_per_s_total"] / (int(ws) * base["samples_per_s_total"])
                                         if base else None)
        results["programs"][program] = runs
    for program in [p for p in args.program_list if want_memory and p not in results["memory"]]:
        print(f"bench: {program} ddp vs fsdp memory at world size {memory_ws} ...",
              file=sys.stderr, flush=True)
        results["memory"][program] = launch(["--worker", "memory", "--program", program, *shared],
                                            memory_ws, args.timeout)
    if "pipeline" in args.table_list and "cifar" in args.program_list:
        print("bench: cifar data paths ...", file=sys.stderr, flush=True)
        results["pipeline"] = launch(
            ["--worker", "pipeline", *shared, "--pipeline-epochs", str(args.pipeline_epochs),
             "--loader-workers", ",".join(map(str, args.loader_workers))], 1, args.timeout)
    return results


def _command(argv: list[str]) -> str:
    return "python bench/bench.py " + " ".join(argv)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f}"


def render(report: dict) -> str:
    """The Markdown document: machine, every table, the command behind each."""
    env = report["environment"]
    dev = env["device"]
    lines = [f"# Benchmarks ({'GPU, NCCL' if dev == 'cuda' else 'CPU, gloo'})", "",
             f"Generated by `{report['command']}` on {env['date']}.", "",
             "| | |", "| --- | --- |",
             f"| machine | {env['device_name']}, {env['cpu_count']} logical CPUs"
             f"{', ' + str(env['gpu_count']) + ' GPU(s)' if dev == 'cuda' else ''} |",
             f"| threads per process | {env['threads_per_process']} |",
             f"| torch | {env['torch_version']} (Python {env['python_version']}) |",
             f"| git commit | {env['git_commit']} |", ""]
    lines += [] if not report["results"]["programs"] else [
        "## Throughput, scaling and where a step's time goes", "",
        "Each program's own model, optimizer, loss and data (built through its `parse_args` / "
        "`build_data` / `build_model`), default *global* batch, so world size 2 runs half the "
        "batch per process (strong scaling: perfect scaling halves the step time). "
        "Each row: warm-up steps, then timed steps (counts in the table). Columns:", "",
        "- **data**: cutting the batch from the in-memory tensors (and, for cifar, normalisation "
        "and random translate/flip on the batch);",
        "- **fwd+bwd**: forward, loss and backward, *without* the all-reduce;",
        "- **comm**: exposed gradient communication = mean fwd+bwd time of normal DDP steps minus "
        "that of steps inside `DistributedDataParallel.no_sync()` (no all-reduce); the two kinds "
        "alternate step by step. It includes waiting for the slower rank; what overlaps with "
        "backward is not counted. 0 at world size 1 (no process group);",
        "- **optimizer**: `optimizer.step()`;",
        "- shares are of the mean step time (they add up to 100%); samples/s per process = "
        "per-rank batch / step time; scaling efficiency = total samples/s / (world size x total "
        "samples/s at world size 1);",
        "- **CPU share**: CPU time of the process / (wall time x its threads) over the timed "
        "steps, the lowest rank (gloo's threads and idle-spinning OpenMP threads count too); "
        "well below 100% means other programs took cores, or (small models at world size 2) "
        "the rank sat waiting for the other one;" if dev != "cuda" else "",
        f"- **peak memory**: {'`torch.cuda.max_memory_allocated`' if dev == 'cuda' else '`ru_maxrss` (whole process: Python, torch, the dataset)'}, "
        "largest over ranks.", *([] if dev == "cuda" else [
            "",
            "On the CPU every row uses all the cores: world size 1 is one process with one thread "
            "per core, world size 2 two processes with half the threads each "
            "(`common.dist.setup`). World size 2 adds no hardware here, so a scaling efficiency "
            "of 50% means the same speed as one process: the rows compare DDP's costs "
            "(gradient all-reduce, half the batch per process) with intra-op threading, not "
            "more machines with fewer."]), ""]
    for program, runs in report["results"]["programs"].items():
        first = next(iter(runs.values()))
        lines += [f"### {program}", "", f"{first['describe']}; bf16 autocast: {first['bf16']}.", "",
                  f"Reproduce: `{_command(report['argv_for'][program])}`", "",
                  "| world size | global / per-rank batch | warm-up + timed steps | samples/s per process "
                  "| samples/s total | scaling efficiency | step ms | data ms (%) | fwd+bwd ms (%) "
                  "| comm ms (%) | optimizer ms (%) | peak memory MiB | CPU share |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for ws, r in runs.items():
            eff = "-" if r["scaling_efficiency"] is None else f"{100 * r['scaling_efficiency']:.0f}%"
            cells = [ws, f"{r['global_batch']} / {r['per_rank_batch']}",
                     f"{r['warmup_steps']} + {r['timed_steps']} (x2 kinds)",
                     f"{r['samples_per_s_per_process']:,.0f}", f"{r['samples_per_s_total']:,.0f}", eff,
                     _ms(r["step_s"])]
            for part in ("data", "fwd_bwd", "comm", "optimizer"):
                cells.append(f"{_ms(r[part + '_s'])} ({100 * r['shares'][part]:.0f}%)")
            cells.append(_mib(r["peak_memory_bytes"]))
            cells.append("-" if dev == "cuda" else f"{100 * r['cpu_share']:.0f}%")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    memory_rows = list(report["results"]["memory"].items())
    if memory_rows:
        ws = memory_rows[0][1]["world_size"]
        lines += [f"## Per-rank memory: `--strategy ddp` vs `fsdp` ({ws} processes)", "",
                  "Bytes of parameters + gradients + optimizer state held by one rank "
                  "(`common.parallel.memory_per_rank`, after one optimizer step of the program's "
                  "optimizer; models wrapped by `common.parallel.wrap_model`), the largest over "
                  "ranks. FSDP shards each block across ranks, so it should be about 1/world size "
                  "(a little more where a block's size does not split evenly). Each program "
                  "records its own figures in `summary.json` (`memory_per_rank`, rank 0's); "
                  "whole runs under both strategies are in [fsdp.md](fsdp.md).", "",
                  f"Reproduce: `{_command(report['argv_memory'])}`", "",
                  "| program | ddp params / grads / optimizer KiB | ddp total KiB "
                  "| fsdp params / grads / optimizer KiB | fsdp total KiB | fsdp / ddp |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for program, m in memory_rows:
            cells = [program]
            for strategy in ("ddp", "fsdp"):
                s = m[strategy]
                cells.append(" / ".join(f"{s[k] / 1024:,.1f}" for k in
                                        ("param_bytes", "grad_bytes", "optimizer_bytes")))
                cells.append(f"{s['total_bytes'] / 1024:,.1f}")
            cells.append(f"{m['fsdp_over_ddp']:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    pipe = report["results"].get("pipeline")
    if pipe:
        lines += ["## CIFAR-10 data path: tensor cache vs ImageFolder + DataLoader", "",
                  f"The same {pipe['images']:,} training JPEGs ({PIPELINE_PER_CLASS} per class, "
                  "the first by file name, from `cifar10-jpg.tar.gz`), batches of "
                  f"{pipe['batch']}, {pipe['timed_epochs']} timed passes after one warm-up pass, "
                  "one process, same run. Images/s = float, normalised, augmented images "
                  "(channels_last) ready for the model's forward. Augmentation of equal strength: "
                  "shift by up to 4 pixels and horizontal flip (the project path: reflect padding "
                  "on the batch, `cifar.data.augment`; torchvision: `RandomCrop(32, padding=4)`, "
                  "`RandomHorizontalFlip`, `ToTensor`, `Normalize`). One-time costs, not in the "
                  f"rates: loading the project's decoded uint8 cache {pipe['cache_load_s']:.2f} s; "
                  f"extracting the JPEGs for ImageFolder {pipe['jpeg_extract_s']:.2f} s.", "",
                  f"Reproduce: `{_command(report['argv_pipeline'])}`", "",
                  "| data path | DataLoader workers | images | seconds | images/s |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for row in [pipe["project"], *pipe["torchvision"]]:
            lines.append(f"| {row['pipeline']} | {row['workers']} | {row['images']:,} | "
                         f"{row['seconds']:.3f} | {row['images_per_s']:,.0f} |")
        lines += ["", f"**Ratio, project path / best torchvision configuration: "
                      f"{pipe['ratio_vs_best_torchvision']:.1f}x.**", ""]

    if dev != "cuda":
        cuda_md = report.get("cuda_report")
        lines += ["## GPU (NCCL)", ""]
        if cuda_md:
            lines += [f"See [{cuda_md}]({cuda_md}).", ""]
        else:
            lines += ["Not measured in this session (no GPU lent). On a machine with 2 GPUs, the "
                      "same benchmark with NCCL (one GPU per process, CUDA-synchronised timers, "
                      "`torch.cuda.max_memory_allocated` as peak memory, the airbench94 preset "
                      "for cifar) is:", "",
                      f"    python bench/bench.py --data-dir {report['data_dir']} --device cuda --out docs/", "",
                      "It writes `docs/benchmarks-cuda.md` and `.json`; this file then links to it "
                      "when regenerated.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker == "program":
        return worker_program(args)
    if args.worker == "memory":
        return worker_memory(args)
    if args.worker == "pipeline":
        return worker_pipeline(args)
    if "RANK" in os.environ:
        raise UserError("run bench/bench.py with plain python: it launches torchrun itself for "
                        "each world size (--world-sizes)")
    argv = list(sys.argv[1:] if argv is None else argv)
    results = run_all(args)
    runs = next(iter(results["programs"].values()), {})
    base = ["--data-dir", str(args.data_dir)] + (["--device", "cuda"] if args.device == "cuda" else [])
    ws = ["--world-sizes", args.world_sizes] if args.world_sizes != "1,2" else []
    report = {
        "command": _command(argv),
        "data_dir": str(args.data_dir),
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": args.device,
            "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_model(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "gpu_count": torch.cuda.device_count() if args.device == "cuda" else 0,
            "threads_per_process": ", ".join(
                f"{r['threads_per_process']} at world size {w}" for w, r in runs.items()) or "-",
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "git_commit": git_commit()},
        "argv_for": {p: base + ["--programs", p, *ws, "--tables", "throughput"]
                     for p in results["programs"]},
        "argv_memory": base + ["--programs", ",".join(results["memory"]), "--world-sizes",
                               str(max(args.world_size_list)), "--tables", "memory"],
        "argv_pipeline": base + ["--programs", "cifar", "--tables", "pipeline"],
        "results": results,
    }
    stem = "benchmarks-cuda" if args.device == "cuda" else "benchmarks"
    if args.out is not None and args.device != "cuda" and (args.out / "benchmarks-cuda.md").is_file():
        report["cuda_report"] = "benchmarks-cuda.md"
    text = render(report)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / f"{stem}.json", report)
        tmp = args.out / f".{stem}.md.tmp"
        tmp.write_text(text)
        os.replace(tmp, args.out / f"{stem}.md")
        print(f"wrote {args.out / (stem + '.md')} and {stem}.json", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
