"""Wrap a model for data-parallel training; the only place that chooses the strategy.

- ``ddp`` (default): every rank holds the whole model; gradients are averaged in backward.
- ``fsdp``: FSDP2 (``fully_shard``): parameters, gradients and optimizer state are sharded
  across ranks and gathered layer by layer for compute, so per-rank memory for them falls by
  about the world size. Same optimisation as DDP; checkpoints are full state dicts either way
  (see common/checkpoint.py), so a run can move between strategies and world sizes.
"""
from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from common.dist import DistInfo

STRATEGIES = ("ddp", "fsdp")


def wrap_model(model: torch.nn.Module, dist: DistInfo, strategy: str = "ddp") -> torch.nn.Module:
    """Move ``model`` to this rank's device and wrap it for ``strategy`` when there are ranks.

    Either way each rank must compute the *mean* loss over its own share of the global batch:
    both strategies average gradients across ranks. A single process is left unwrapped.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    model = model.to(dist.device)
    if not dist.is_distributed:
        return model
    if strategy == "fsdp":
        return _fully_shard(model, dist)
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP shards one by one: the model's children that hold parameters.

    A lone container child (``self.net = nn.Sequential(...)``) is looked through, so an MLP or a
    CNN written as one Sequential is still sharded per layer / per block.
    """
    children = [c for c in model.children() if any(True for _ in c.parameters())]
    if len(children) == 1 and isinstance(children[0], (torch.nn.Sequential, torch.nn.ModuleList)):
        return shard_units(children[0])
    return children


def _fully_shard(model: torch.nn.Module, dist: DistInfo) -> torch.nn.Module:
    # bf16 compute with fp32 gradient reduction on GPUs; full fp32 on CPU (gloo, exactness).
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if dist.device.type == "cuda" else MixedPrecisionPolicy())
    for unit in shard_units(model):
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the root: leftover parameters, and drives the units
    return model


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # DTensor shard
    return local.numel() * local.element_size()


def memory_per_rank(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state held by *this* rank."""
    params = list(model.parameters())
    optimizer_bytes = sum(_local_bytes(v) for state in optimizer.state.values()
                          for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    result = {
        "param_bytes": sum(_local_bytes(p) for p in params),
        "grad_bytes": sum(_local_bytes(p) for p in params if p.requires_grad),  # as allocated in backward
        "optimizer_bytes": optimizer_bytes,
    }
    result["total_bytes"] = sum(result.values())
    return result
