"""Agreement between ranks: one decision, one verdict, one error line for the whole job.

Every rank of a job must take the same path: when one rank's data is bad, its checkpoint
differs, or its download failed, all of them stop with the same ``error:`` line, instead of one
rank exiting and the others dying in their next collective with a traceback. These helpers pass
small picklable values between the ranks (``all_gather_object``, ``broadcast_object``) and turn
them into one verdict (``stop_if_any_rank_failed``, ``agreed``, ``stop_unless_all_ranks_agree``,
with ``tensor_digest`` to compare tensors by a short string); ``on_local_rank_zero_first`` lets
one process per node do shared work (a download, a cache) before the others.

Every function but ``tensor_digest`` is a collective: call it on every rank. For a single
process each is the obvious no-op (the value itself, a UserError instead of an exit).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
import torch.distributed as tdist

from common.dist import DistInfo
from common.errors import UserError, write_error_line

T = TypeVar("T")


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
        problem = f"{what} differs between ranks (rank 0: {views[0]}; rank {differing[0]}: {views[differing[0]]})"
    stop_if_any_rank_failed(problem, dist)
