"""Process-group setup and teardown: the one place that reads torchrun's environment.

``setup()`` works in two modes (nanoGPT's rule: ``RANK`` in the environment means torchrun):
- launched by torchrun: joins the process group (NCCL on CUDA, gloo on CPU) and binds this
  process to ``cuda:LOCAL_RANK``, even when it is the only process (``--nproc_per_node=1``
  runs the same DDP/FSDP and collective code paths as eight processes do);
- plain ``python program.py``: a single process, no process group, every collective a no-op.

It follows the PyTorch DDP tutorial's steps: read the environment, set the CUDA device,
``init_process_group``. One addition: the group is built on a rendezvous store whose keys
belong to this attempt alone (common/rendezvous.py says why a restarted job needs that).
Collectives that make the ranks agree on something are in common/agree.py.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from common.errors import UserError, report
from common.rendezvous import store_for_this_attempt

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job. Pass it down; never re-read the environment."""

    rank: int  # global rank, 0 .. world_size-1
    local_rank: int  # rank within this node; selects the GPU
    world_size: int
    local_world_size: int  # processes on this node; divides the CPU threads
    device: torch.device
    in_group: bool = False  # joined a process group (launched by torchrun), even a group of one

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the only rank that writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when collectives must run: several ranks, or a torchrun launch of one."""
        return self.world_size > 1 or self.in_group


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """Map ``--device {auto,cpu,cuda}`` to a concrete device for this process."""
    if requested not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    n_gpus = torch.cuda.device_count()
    if local_rank >= n_gpus:
        raise UserError(
            f"local rank {local_rank} has no GPU: this node has {n_gpus}; launch at most --nproc_per_node={n_gpus}"
        )
    return torch.device("cuda", local_rank)


def setup(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group if launched by torchrun, pick the device, share out CPU threads.

    ``timeout_s`` bounds every collective, so a rank that dies outside torchrun's watch turns
    into an error on the others instead of a hang.
    """
    launched = "RANK" in os.environ
    if launched:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        world_size = int(os.environ["WORLD_SIZE"])
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    else:
        rank, local_rank, world_size, local_world_size = 0, 0, 1, 1

    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        # Must happen before init_process_group so NCCL binds to the right GPU.
        torch.cuda.set_device(dev)
    else:
        # Processes on one machine would otherwise each start one thread per core and fight.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))

    if launched and not tdist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        tdist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            store=store_for_this_attempt(rank, world_size, timeout),  # keys of this attempt only
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank, local_rank, world_size, local_world_size, dev, in_group=launched)


def teardown() -> None:
    """Leave the process group; safe to call when none was joined."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistInfo]:
    """``with distributed(args.device) as dist:`` - setup, and teardown even on error.

    A UserError's line is printed before the group is left (``common.errors.report``).
    """
    info = setup(device, timeout_s)
    try:
        yield info
    except UserError as err:
        report(err)
        raise
    finally:
        teardown()
