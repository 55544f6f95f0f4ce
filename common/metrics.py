"""Exact metric reduction across ranks: sum the parts, then divide (never average averages).

Each rank evaluates its own shard (``common.data.eval_shard``); these helpers combine the parts
so the result equals what one process would compute on the whole set. Every function is a no-op
reduction for a single process, and every rank must call it (they are collectives).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

from common.dist import DistInfo


def _comm_device(dist: DistInfo) -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    return dist.device if dist.device.type == "cuda" else torch.device("cpu")


def reduce_sums(values: dict[str, float | int | torch.Tensor], dist: DistInfo) -> dict[str, float]:
    """Sum named scalars over ranks, in float64 so the totals match one process to ~1e-15.

    Example: ``t = reduce_sums({"loss": loss_sum, "n": count}, dist); mean = t["loss"] / t["n"]``
    """
    keys = list(values)
    parts = [
        v.detach().double().sum() if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)
        for v in values.values()
    ]
    stacked = torch.stack([p.cpu() for p in parts]).to(_comm_device(dist))
    if dist.is_distributed:
        tdist.all_reduce(stacked, op=tdist.ReduceOp.SUM)
    return dict(zip(keys, stacked.cpu().tolist()))


def all_reduce_tensor(tensor: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Element-wise sum of a tensor over ranks (e.g. a confusion matrix); returns a CPU copy."""
    out = tensor.detach().clone().to(_comm_device(dist))
    if dist.is_distributed:
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out.cpu()


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts ``[true_class, predicted_class]`` for one batch or shard, as int64, on the inputs'
    device (add batches up there; ``all_reduce_tensor`` brings the total to the host once)."""
    flat = targets.long().reshape(-1) * num_classes + predictions.long().reshape(-1)
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def gather_tensors(local: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Concatenate each rank's tensor (lengths may differ) in rank order, on every rank.

    With ``eval_shard``'s contiguous shards, the result is in the dataset's original order, so
    thresholds, curves and plots computed from it match a single-process run exactly.
    """
    local = local.detach()
    if not dist.is_distributed:
        return local.cpu()
    device = _comm_device(dist)
    length = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(dist.world_size)]
    tdist.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    # all_gather needs equal shapes: pad to the longest part, then trim each part back.
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(dist.world_size)]
    tdist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]).cpu()
