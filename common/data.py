"""Per-rank data: training batches over a shared shuffle, evaluation shards with no padding.

All three programs keep their data in memory as tensors (tabular sets, CIFAR-10 as uint8), so
batches are cut by indexing tensors directly rather than through a per-sample ``DataLoader``:
it is much faster and keeps the sampling rule in one readable place.

Training (``TrainBatches``): like ``DistributedSampler``, every rank draws the same permutation
(seeded by ``seed + epoch``) and takes its share. Unlike it, the permutation is first cut into
*global* batches of ``global_batch_size`` and each global batch is then split across ranks, so
1 process with batch B and N processes with B/N each see exactly the same samples per step.
The remainder (``n % global_batch_size`` samples) joins the last batch, so every sample is drawn
exactly once per epoch and nothing is padded or duplicated. That last batch may not split
evenly: ``TrainBatches.global_mean`` weights each rank's mean loss by its share, so the
averaged gradient is still the one process's.

Placement: both yield batches on ``dist.device``; a program never moves a batch itself, so a
model on ``cuda:LOCAL_RANK`` cannot meet a batch (or a target) left on the CPU. The tensors may
start on any device: ``TrainBatches`` moves its tensors to the device once (these data sets fit
in GPU memory, and then a step costs no host-to-device copy), ``eval_batches`` moves the rank's
shard once per call.

Evaluation (``eval_shard``): rank r gets the contiguous slice ``[r*n//W, (r+1)*n//W)``. The
shards cover every sample once, so sums reduced across ranks equal the single-process sums, and
per-sample results gathered in rank order come back in the original order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from common.dist import DistInfo
from common.errors import UserError


def per_rank_batch_size(global_batch_size: int, dist: DistInfo) -> int:
    """The batch each rank processes; the global batch must split evenly across ranks."""
    if global_batch_size < dist.world_size:
        raise UserError(
            f"--batch-size {global_batch_size} is smaller than the world size {dist.world_size}; "
            "it is the global batch, shared across ranks"
        )
    if global_batch_size % dist.world_size:
        raise UserError(
            f"--batch-size {global_batch_size} does not divide by the world size "
            f"{dist.world_size}; use a multiple of {dist.world_size}"
        )
    return global_batch_size // dist.world_size


class TrainBatches:
    """Shuffled training batches for this rank, on ``dist.device``; iterate with ``.epoch(e)``.

    There is no way to iterate without naming the epoch, so the reshuffle that
    ``DistributedSampler.set_epoch`` needs cannot be forgotten. ``start_step`` skips batches
    already trained, for resuming in the middle of an epoch.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        global_batch_size: int,
        dist: DistInfo,
        seed: int,
    ) -> None:
        self.n = len(tensors[0])
        if any(len(t) != self.n for t in tensors):
            raise ValueError("all tensors must have the same first dimension")
        per_rank_batch_size(global_batch_size, dist)  # validates divisibility
        if self.n < global_batch_size:
            raise UserError(f"--batch-size {global_batch_size} is larger than the training set ({self.n} samples)")
        self.tensors = [t.to(dist.device) for t in tensors]  # once: a no-op if already there
        self.global_batch_size = global_batch_size
        self.dist = dist
        self.seed = seed

    def __len__(self) -> int:
        """Optimizer steps per epoch."""
        return self.n // self.global_batch_size

    def global_order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of sample indices, the same on every rank and world size."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=generator)

    def _local_part(self, order: torch.Tensor, step: int) -> torch.Tensor:
        """This rank's share of global batch ``step``; the last batch takes the remainder."""
        start = step * self.global_batch_size
        return order[start : start + self.global_size(step)][self.dist.rank :: self.dist.world_size]

    def global_size(self, step: int) -> int:
        """How many samples global batch ``step`` holds, over all ranks (the last takes the
        remainder); this rank holds positions ``rank, rank + world_size, ...`` of it."""
        start = step * self.global_batch_size
        return (self.n if step == len(self) - 1 else start + self.global_batch_size) - start

    def global_mean(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """This rank's *mean* loss over its share of global batch ``step``, weighted so that
        the average over ranks (what DDP and FSDP do to gradients) is the mean over the whole
        global batch: call ``batches.global_mean(loss, step).backward()``.

        The factor is ``local_n * world_size / global_n``: exactly 1 for every batch that
        splits evenly, and different from 1 only on the last batch when the remainder leaves
        the ranks unequal shares (at 3 ranks a last batch of 8 rows splits 3/3/2), where an
        unweighted average would count the rows of the smaller share more.
        """
        global_n = self.global_size(step)
        local_n = len(range(self.dist.rank, global_n, self.dist.world_size))
        return loss * (local_n * self.dist.world_size / global_n)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield this rank's batches for ``epoch``, on ``dist.device``."""
        # The permutation is drawn on the CPU (the same numbers on every device), then moved.
        order = self.global_order(epoch).to(self.dist.device)
        for step in range(start_step, len(self)):
            idx = self._local_part(order, step)
            yield tuple(t[idx] for t in self.tensors)


def fixed_chunks(n: int, chunk: int, dist: DistInfo) -> list[slice]:
    """This rank's share of ``n`` samples as the slices of fixed global chunks: samples
    ``[0, chunk)``, ``[chunk, 2 chunk)``, ... (the last one shorter), each chunk on one rank,
    each rank's chunks contiguous and in order (so ``gather_tensors`` restores the order).

    A sample then sits in the same chunk at the same position at any world size. Scored in
    chunks padded to ``chunk`` rows, it gets the same bits however many ranks share the work:
    a matrix product's kernel, and so its last bits, depends on the number of rows (float64
    scores of 451 rows in one batch and in three of about 150 differ). A rank may get no chunk.
    """
    chunks = torch.arange(-(-n // chunk)).tensor_split(dist.world_size)[dist.rank].tolist()
    return [slice(k * chunk, min(n, (k + 1) * chunk)) for k in chunks]


def eval_shard(n: int, dist: DistInfo) -> slice:
    """This rank's contiguous, non-overlapping share of ``n`` evaluation samples."""
    return slice(dist.rank * n // dist.world_size, (dist.rank + 1) * n // dist.world_size)


def eval_batches(
    tensors: Sequence[torch.Tensor],
    batch_size: int,
    dist: DistInfo,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield this rank's evaluation batches on ``dist.device``: its shard, in order, each once.

    ``batch_size`` is the most samples per batch on one rank. Every rank yields the *same
    number* of batches (its shard cut into nearly equal parts), because a sharded model (FSDP)
    runs collectives inside ``forward`` and a rank with one batch fewer would leave the others
    waiting. A batch can be empty only when there are fewer samples than ranks x batches;
    every rank must still join the metric reductions that follow.
    """
    n = len(tensors[0])
    largest_shard = -(-n // dist.world_size)
    num_batches = -(-largest_shard // batch_size)
    shard = eval_shard(n, dist)
    local = [t[shard].to(dist.device) for t in tensors]
    for part in torch.arange(len(local[0])).tensor_split(num_batches):
        yield tuple(t[part[0] : part[0] + len(part)] if len(part) else t[:0] for t in local)
