"""Wrap a model for data-parallel training; the only place that chooses the strategy.

- ``ddp`` (default): every rank holds the whole model; gradients are averaged in backward.
- ``fsdp``: FSDP2 (``fully_shard``): parameters, gradients and optimizer state are sharded
  across ranks and gathered block by block for compute (``shard_units``), so per-rank memory
  for them falls by about the world size. Same optimisation as DDP; checkpoints are full state
  dicts either way (see common/checkpoint.py), so a run can move between strategies and world
  sizes.

Under FSDP the parameters are ``DTensor`` shards, so three things a program does with a plain
model need a helper from here: build the optimizer *after* ``wrap_model`` (it must hold the
shards; pass ``foreach=True``, see below), evaluate on a rank alone or in another dtype
(``local_copy``), and save or restore per-parameter state it keeps itself, such as an EMA of
the weights (``full_tensors`` / ``shard_like``).

Every op on a DTensor first works out how its result is sharded, and caches that plan keyed
on the op's arguments. An optimizer's per-tensor loop (the CPU default) passes scalars that a
schedule changes every step, such as Adam's beta1 under OneCycleLR, so every step misses the
cache; ``foreach=True`` passes them once per step and gives bit-identical weights
(docs/fsdp.md measures the difference).

A layer whose statistics must cover the global batch rather than this rank's share (CIFAR's
world-size-invariant BatchNorm) sums its parts with ``sum_over_ranks``, which is differentiable.

FSDP, DTensor and torch.distributed.checkpoint are imported inside the functions that use them
(slow to import, in every process): a DDP run, or one that stops at a bad argument, does not load them.
"""

from __future__ import annotations

import copy
import sys
import weakref

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from common.dist import DistInfo

STRATEGIES = ("ddp", "fsdp")

# Sharded model -> its unsharded twin on the meta device (no memory), kept to build local_copy.
_UNSHARDED_TEMPLATES: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


def wrap_model(model: torch.nn.Module, dist: DistInfo, strategy: str = "ddp") -> torch.nn.Module:
    """Move ``model`` to this rank's device and wrap it for ``strategy`` when there are ranks.

    Either way each rank must compute the *mean* loss over its own share of the global batch:
    both strategies average gradients across ranks. A single process is left unwrapped. Build
    the optimizer from the returned model's parameters (FSDP replaces them with shards).
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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP and/or torch.compile wrappers (saved without ``module.``).

    A sharded model is returned as it is: FSDP2 shards in place, there is no wrapper to remove.
    """
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def is_sharded(model: torch.nn.Module) -> bool:
    """True when ``wrap_model`` sharded ``model`` (its parameters are FSDP's ``DTensor`` shards)."""
    return unwrap(model) in _UNSHARDED_TEMPLATES


# A block with fewer parameters (0.4 MB in fp32) is sharded together with the root instead of
# on its own: each FSDP unit adds an all-gather before its forward and backward and a
# reduce-scatter after, and saves only its transient memory; the bytes held at rest are the same
# either way (docs/fsdp.md measures the anomaly autoencoder both ways).
MIN_UNIT_PARAMS = 100_000


def shard_units(model: torch.nn.Module, min_params: int = MIN_UNIT_PARAMS) -> list[torch.nn.Module]:
    """The blocks FSDP shards one by one: children holding ``min_params`` parameters or more.

    Containers (``nn.Sequential``, ``nn.ModuleList``) are looked through, so the residual groups
    of a CNN, the blocks of a ResNet stage or the layers of an MLP written as one Sequential are
    candidates each. Smaller blocks stay with the root unit.
    """
    units = []
    for child in model.children():
        if isinstance(child, (torch.nn.Sequential, torch.nn.ModuleList)):
            units += shard_units(child, min_params)
        elif sum(p.numel() for p in child.parameters()) >= min_params:
            units.append(child)
    return units


def _fully_shard(model: torch.nn.Module, dist: DistInfo) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _UNSHARDED_TEMPLATES[model] = copy.deepcopy(model).to("meta")
    # FSDP2 splits each parameter along dim 0 of its storage and refuses permuted layouts such
    # as channels_last conv weights; inputs may stay channels_last, the gathered weights do not.
    for param in model.parameters():
        if not param.is_contiguous():
            param.data = param.data.contiguous()
    # The mesh is built from this rank's device: without one, fully_shard picks the default
    # accelerator, so `--device cpu` on a GPU host would put the shards on CUDA while gloo and
    # the data stay on the CPU.
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    # No MixedPrecisionPolicy: shards are gathered, computed with and reduced in the parameters'
    # own dtype (fp32), exactly what DDP does. Lower precision is the program's own choice, made
    # with torch.autocast in its loop under either strategy (cifar's bf16): a policy here would
    # also cast BatchNorm's weights to bf16 beside fp32 running statistics, and the fp32 buffers
    # of other models (anomaly's PCA projection) would meet bf16 weights.
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: the smaller blocks, and drives the units
    if any(True for _ in model.buffers()):
        # DDP broadcasts rank 0's buffers (BatchNorm statistics) before every forward; FSDP
        # leaves each rank its own. Doing what DDP does keeps evaluation and checkpoints the
        # same under either strategy.
        model.register_forward_pre_hook(_broadcast_buffers_from_rank0)
    return model


@torch.no_grad()
def _broadcast_buffers_from_rank0(module: torch.nn.Module, _args) -> None:
    # One broadcast per dtype, not per buffer (AirNet has 21 buffers): on gloo each collective
    # costs about a millisecond whatever its size. Grouped in module order, the same on every rank.
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        tdist.broadcast(flat, src=0)
        for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
            buffer.copy_(value.view_as(buffer))


def local_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain module with the whole model's current weights and buffers, on every rank.

    Its forward runs no collectives, so a rank can evaluate its own shard of the data alone,
    in another dtype (``local_copy(model).double()``), or a rank 0 can save it. Under FSDP this
    gathers the parameters and must be called on every rank; otherwise it is a deep copy.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = unwrap(model)
    if not is_sharded(inner):
        return copy.deepcopy(inner)
    device = next(p.device for p in inner.parameters())
    full = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True))
    plain = copy.deepcopy(_UNSHARDED_TEMPLATES[inner]).to_empty(device=device)
    plain.load_state_dict(full)
    for name, buffer in inner.named_buffers():  # non-persistent buffers are not in ``full``
        plain.get_buffer(name).copy_(buffer)
    return plain


def is_shard(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP shard). Nothing is unless DTensor was imported,
    so this never imports it: cheap enough for a per-parameter loop."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds: a shard's local tensor (in-place ops on it change
    the shard), anything else itself."""
    return tensor.to_local() if is_shard(tensor) else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A shard's whole value on every rank (a collective: call on every rank), else ``tensor``."""
    return tensor.full_tensor() if is_shard(tensor) else tensor


def whole_from_parts(like: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose parts the ranks hold as ``part``, split the way ``like`` is (a
    collective when ``like`` is a shard; else ``part`` is already whole)."""
    if not is_shard(like):
        return part
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        part, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    ).full_tensor()


def own_part(like: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This rank's part of the whole ``value`` (the same on every rank), split the way ``like``
    is: a local slice, no communication. ``value`` itself when ``like`` is not a shard."""
    if not is_shard(like):
        return value
    from torch.distributed.tensor import DTensor, Replicate

    replicated = DTensor.from_local(value, like.device_mesh, [Replicate()] * like.device_mesh.ndim)
    return replicated.redistribute(like.device_mesh, like.placements).to_local()


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every FSDP shard gathered into the whole tensor; the rest as they are.

    For state a program keeps per parameter (an EMA of the weights, say) that must go into a
    checkpoint in a form any strategy and world size can read. A collective under FSDP: call on
    every rank with the same keys in the same order.
    """
    return {name: whole(t.detach()) if is_shard(t) else t for name, t in tensors.items()}


def shard_like(tensors: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``full_tensors``: each whole tensor split the way ``like[name]`` is.

    ``like`` is typically ``unwrap(model).state_dict()``; entries that are not shards there are
    only moved to its device.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for name, t in tensors.items():
        ref = like[name]
        if isinstance(ref, DTensor):
            out[name] = distribute_tensor(t.detach().to(ref.to_local().device), ref.device_mesh, ref.placements)
        else:
            out[name] = t.to(ref.device)
    return out


def _local_bytes(tensor: torch.Tensor) -> int:
    local = local_part(tensor)
    return local.numel() * local.element_size()


def memory_per_rank(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state held by *this* rank.

    Under FSDP rank 0 holds the largest shards (an uneven split rounds up on the first ranks),
    so rank 0's figures, the ones a summary records, are the per-rank maximum.
    """
    params = list(model.parameters())
    optimizer_bytes = sum(
        _local_bytes(v)
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    result = {
        "param_bytes": sum(_local_bytes(p) for p in params),
        "grad_bytes": sum(_local_bytes(p) for p in params if p.requires_grad),  # as allocated in backward
        "optimizer_bytes": optimizer_bytes,
    }
    result["total_bytes"] = sum(result.values())
    return result


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
