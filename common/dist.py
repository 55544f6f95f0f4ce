"""Process-group setup and teardown: the one place that reads torchrun's environment.

``setup()`` works in two modes (nanoGPT's rule: ``RANK`` in the environment means torchrun):
- launched by torchrun: joins the process group (NCCL on CUDA, gloo on CPU) and binds this
  process to ``cuda:LOCAL_RANK``, even when it is the only process (``--nproc_per_node=1``
  runs the same DDP/FSDP and collective code paths as eight processes do);
- plain ``python program.py``: a single process, no process group, every collective a no-op.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as tdist

from common.errors import UserError, write_error_line

DEFAULT_TIMEOUT_S = 300.0
T = TypeVar("T")


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
            f"local rank {local_rank} has no GPU: this node has {n_gpus}; "
            f"launch at most --nproc_per_node={n_gpus}"
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
            store=_store_for_this_attempt(rank, world_size, timeout),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank, local_rank, world_size, local_world_size, dev, in_group=launched)


def _store_for_this_attempt(rank: int, world_size: int, timeout: datetime.timedelta) -> tdist.Store:
    """The rendezvous key-value store, in a namespace that every rank of this attempt shares.

    After a restart (``--max-restarts``) torchrun hands the workers the same store as before,
    still holding the previous attempt's peer addresses under the same keys; a rank that starts
    faster than a peer reads the dead peer's address and the job hangs or fails to connect (the
    symptom of pytorch/pytorch#167288). So each attempt needs keys of its own.

    The namespace cannot come from ``TORCHELASTIC_RESTART_COUNT``: torchrun's agent counts it
    per node, and only restarts after a *failure* count (torch/distributed/elastic/agent/server/
    api.py, ``_invoke_run``). When a worker dies on node A while node B's workers are busy
    outside a collective (loading data, evaluating, writing a checkpoint), B's agent sees a
    healthy group and a node waiting to rejoin, and restarts its workers as a *membership
    change*: A's workers get count 1, B's count 0, and the two halves would wait for each other
    in different namespaces until the timeout (tests/test_faults.py reproduces this). The
    rendezvous round, which the agents do share, is not passed to the workers.

    Instead the ranks agree on a generation through the store itself (``_agree_on_generation``):
    rank 0 draws a fresh number, every other rank acknowledges it, rank 0 confirms. A number
    left over from an earlier attempt is never confirmed again, so no rank can settle on it.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = tdist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=world_size,
        is_master=rank == 0 and not agent_hosts_store,  # without torchrun's agent, rank 0 hosts
        timeout=timeout,
        multi_tenant=True,
    )
    generation = _agree_on_generation(store, rank, world_size, timeout)
    return tdist.PrefixStore(f"torchdist/generation{generation}", store)


_POLL_S = 0.05


def _agree_on_generation(store: tdist.Store, rank: int, world_size: int,
                         timeout: datetime.timedelta) -> int:
    """A number all ranks of this attempt share and no earlier attempt used.

    Rank 0 is unique in an attempt, and every worker of the previous attempt is dead before
    any worker of the next one starts (torchrun stops them before it rendezvouses again). So:
    rank 0 takes the next number from a counter that survives in the store (``leader``); rank r
    acknowledges a leader number only if it is newer than the last one rank r acknowledged
    (``ack/r``, a leftover of the previous attempt is not); rank 0 confirms once every rank has
    acknowledged its number. A rank that acknowledged a stale number (its predecessor died
    before acknowledging it) waits for the confirmation that never comes, sees the new leader
    number instead, and acknowledges that one.
    """
    deadline = time.monotonic() + timeout.total_seconds()

    def wait_a_little(what: str) -> None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: no agreement on the rendezvous namespace within "
                               f"{timeout.total_seconds():.0f}s ({what})")
        time.sleep(_POLL_S)

    if rank == 0:
        generation = store.add("torchdist/counter", 1)
        store.set("torchdist/leader", str(generation))
        for peer in range(1, world_size):
            while not (store.check([f"torchdist/ack/{peer}"])
                       and int(store.get(f"torchdist/ack/{peer}")) == generation):
                wait_a_little(f"waiting for rank {peer}")
        store.set(f"torchdist/confirmed/{generation}", "1")
        return generation
    while True:
        while not store.check(["torchdist/leader"]):
            wait_a_little("waiting for rank 0")
        leader = int(store.get("torchdist/leader"))
        acked = int(store.get(f"torchdist/ack/{rank}")) if store.check([f"torchdist/ack/{rank}"]) else 0
        if leader <= acked:  # the previous attempt's number: our predecessor acknowledged it
            wait_a_little("waiting for rank 0")
            continue
        store.set(f"torchdist/ack/{rank}", str(leader))
        while True:
            if store.check([f"torchdist/confirmed/{leader}"]):
                return leader
            if int(store.get("torchdist/leader")) != leader:
                break  # we acknowledged a stale number; a new rank 0 has drawn its own
            wait_a_little("waiting for rank 0 to confirm")


def teardown() -> None:
    """Leave the process group; safe to call when none was joined."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistInfo]:
    """``with distributed(args.device) as dist:`` - setup, and teardown even on error."""
    try:
        yield setup(device, timeout_s)
    finally:
        teardown()


def barrier(dist: DistInfo) -> None:
    """Wait for every rank; a no-op for a single process."""
    if dist.is_distributed:
        if dist.device.type == "cuda":
            tdist.barrier(device_ids=[dist.device.index])
        else:
            tdist.barrier()


def broadcast_object(obj: object, dist: DistInfo, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank (e.g. a decision made on rank 0)."""
    if not dist.is_distributed:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src, device=dist.device)
    return box[0]


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) in the forward pass; in the backward, the gradients every rank received
    for the sum are summed too (each rank's loss depends on every rank's part)."""

    @staticmethod
    def forward(ctx, part: torch.Tensor) -> torch.Tensor:
        total = part.clone()
        tdist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        tdist.all_reduce(grad)
        return grad


def sum_over_ranks(part: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's ``part``, differentiable (e.g. batch statistics over the global
    batch); ``part`` itself outside a process group. Call on every rank (a collective)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return part
    return _SumOverRanks.apply(part)


def all_gather_object(obj: object, dist: DistInfo) -> list[object]:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` for one process).

    Use for small per-rank results or verdicts, e.g. letting every rank learn that one rank's
    input was bad so that all of them stop with the same message.
    """
    if not dist.is_distributed:
        return [obj]
    gathered: list[object] = [None] * dist.world_size
    tdist.all_gather_object(gathered, obj)
    return gathered


def stop_if_any_rank_failed(problem: str | None, dist: DistInfo) -> None:
    """Every rank passes its verdict (None = fine); if any rank found a problem, all stop.

    Each rank prints the first problem as one ``error:`` line and waits for the others to have
    printed before exiting with status 2: the first rank to exit makes torchrun kill the rest,
    on a busy machine sometimes before they could say why. A single process raises UserError.
    Call on every rank (it is a collective), e.g. right after loading and validating the data.
    """
    problems = [p for p in all_gather_object(problem, dist) if p is not None]
    if not problems:
        return
    if not dist.is_distributed:
        raise UserError(problems[0])
    write_error_line(problems[0], dist.rank)
    barrier(dist)
    raise SystemExit(2)  # run_main exits with this status and prints nothing more


def agreed(fn: Callable[[], T], dist: DistInfo) -> T:
    """Run ``fn`` on every rank; a UserError on any rank stops every rank with that one
    ``error:`` line and exit status 2 (``stop_if_any_rank_failed``), even where ``fn`` worked
    (a node whose copy of the data differs). Call on every rank; returns ``fn()``'s result."""
    result, problem = None, None
    try:
        result = fn()
    except UserError as err:
        problem = str(err)
    stop_if_any_rank_failed(problem, dist)
    return result


def on_local_rank_zero_first(fn: Callable[[], T], dist: DistInfo) -> T:
    """Run ``fn`` on each node's local rank 0 while the node's other ranks wait, then on them.

    For work every rank needs but one process per node should do first: downloading a file, or
    decoding a dataset into a cache file that the other ranks then only read. So ``fn`` must be
    cheap to call again once a first call succeeded (typically "load X, building it first if it
    is missing"). A UserError from ``fn`` on any rank stops every rank with that one ``error:``
    line and exit status 2 (``stop_if_any_rank_failed``); when a first call fails, the waiting
    ranks never call ``fn``. The wait is a collective, so it is bounded by ``--dist-timeout``.
    Call on every rank. Returns ``fn()``'s result on every rank.
    """
    def attempt(now: bool) -> tuple[T | None, str | None]:
        if not now:
            return None, None
        try:
            return fn(), None
        except UserError as err:
            return None, str(err)

    first = dist.local_rank == 0
    result, problem = attempt(first)
    stop_if_any_rank_failed(problem, dist)  # also the wait: nobody passes until the first calls end
    later, problem = attempt(not first)
    stop_if_any_rank_failed(problem, dist)
    return result if first else later


def tensor_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of named tensors (names, dtypes and bytes): equal iff bit-identical contents."""
    digest = hashlib.sha256()
    for name, tensor in named:
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{data.numel()};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stop_unless_all_ranks_agree(value: object, what: str, dist: DistInfo) -> None:
    """Every rank passes its view of something that must be the same everywhere (a digest of
    its data, the state it resumes from); unless all are equal, every rank stops with one
    ``error:`` line naming the first rank that differs from rank 0. Call on every rank."""
    views = all_gather_object(value, dist)
    differing = [rank for rank, view in enumerate(views) if view != views[0]]
    problem = None
    if differing:
        problem = (f"{what} differs between ranks (rank 0: {views[0]}; rank {differing[0]}: "
                   f"{views[differing[0]]})")
    stop_if_any_rank_failed(problem, dist)
