"""Measuring a workload on every rank: step parts, communication, peak memory, ddp vs fsdp.

What the numbers mean is in bench/bench.py's docstring; ``worker_program`` and ``worker_memory``
are the measuring processes ``bench.py`` launches (with python or torchrun).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from bench.workloads import WORKLOADS, Workload
from common.data import TrainBatches
from common.dist import DistInfo, distributed
from common.errors import UserError
from common.metrics import gather_tensors
from common.parallel import memory_per_rank, wrap_model
from common.records import write_json_atomic

# Timed steps per program: each kind (normal / no_sync) runs this many. The small tabular
# models take milliseconds per step, so they get more steps for the same timing noise.
DEFAULT_STEPS = {"housing": 100, "cifar": 20, "anomaly": 100, "synthetic": 20}
DEFAULT_WARMUP = {"housing": 10, "cifar": 3, "anomaly": 10, "synthetic": 3}


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
        skip = (
            model.no_sync()
            if kind == "no_sync" and isinstance(model, DistributedDataParallel)
            else contextlib.nullcontext()
        )
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
    return {**{kind: {k: v / steps for k, v in parts.items()} for kind, parts in sums.items()}, "cpu_share": cpu_share}


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
        result[strategy] = {
            "per_rank": [dict(zip(keys, map(int, row))) for row in per_rank.tolist()],
            **{k: int(per_rank[:, j].max()) for j, k in enumerate(keys)},
        }
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
        row = [
            parts["sync"]["data"],
            parts["sync"]["fwd_bwd"],
            parts["sync"]["optimizer"],
            parts["no_sync"]["data"],
            parts["no_sync"]["fwd_bwd"],
            parts["no_sync"]["optimizer"],
            float(peak),
            parts["cpu_share"],
        ]
        ranks = gather_tensors(torch.tensor([row], dtype=torch.float64), dist)
        # After the peak was read, so the extra models do not count in it.
        memory = strategy_memory(wl, dist) if args.with_memory and dist.is_distributed else None
        if dist.is_main:
            write_json_atomic(
                args.result,
                {
                    "program": wl.name,
                    "describe": wl.describe,
                    "world_size": dist.world_size,
                    "device": dist.device.type,
                    "device_name": _device_name(dist.device),
                    "threads_per_process": torch.get_num_threads(),
                    "global_batch": wl.global_batch,
                    "per_rank_batch": wl.global_batch // dist.world_size,
                    "bf16": wl.bf16,
                    "warmup_steps": warmup,
                    "timed_steps": steps,
                    "data_setup_s": wl.setup_s,
                    **summarize(ranks.tolist(), wl.global_batch, dist.world_size),
                    "strategy_memory": memory,
                },
            )


def worker_memory(args: argparse.Namespace) -> None:
    """The ddp-vs-fsdp per-rank bytes of one program (launched with world size > 1)."""
    with distributed(args.device) as dist, tempfile.TemporaryDirectory() as scratch:
        if not dist.is_distributed:
            raise UserError("the ddp-vs-fsdp memory comparison needs world size > 1")
        wl = WORKLOADS[args.program](args, dist, Path(scratch))
        memory = strategy_memory(wl, dist)
        if dist.is_main:
            write_json_atomic(
                args.result, {"program": wl.name, "describe": wl.describe, "world_size": dist.world_size, **memory}
            )


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
        "step_s": step,
        **parts,
        "shares": {k.removesuffix("_s"): v / step for k, v in parts.items()},
        "comm_raw_s": fb_sync - fb_nosync,
        "no_sync_step_s": mean[3] + fb_nosync + mean[5],
        "samples_per_s_per_process": per_process,
        "samples_per_s_total": per_process * world_size,
        "peak_memory_bytes": int(max(r[6] for r in ranks)),
        "cpu_share": min(r[7] for r in ranks),
        "per_rank": [
            {
                "data_s": r[0],
                "fwd_bwd_sync_s": r[1],
                "optimizer_s": r[2],
                "fwd_bwd_no_sync_s": r[4],
                "peak_memory_bytes": int(r[6]),
                "cpu_share": r[7],
            }
            for r in ranks
        ],
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
