"""Wrap a model for data-parallel training; the only place that chooses the strategy."""
from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from common.dist import DistInfo


def wrap_model(model: torch.nn.Module, dist: DistInfo) -> torch.nn.Module:
    """Move ``model`` to this rank's device and wrap it in DDP when there are several ranks.

    DDP broadcasts rank 0's parameters at construction and averages gradients in backward, so
    each rank must compute the *mean* loss over its own share of the global batch.
    """
    model = model.to(dist.device)
    if not dist.is_distributed:
        return model
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
