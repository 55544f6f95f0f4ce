"""cifar/train.py's schedule, airbench's Lookahead-EMA of the weights, and the Muon optimizer."""

from __future__ import annotations

from collections.abc import Callable

import torch

from common.parallel import full_tensors, local_part, own_part, shard_like, whole, whole_from_parts


def triangular(steps: int, warmup: float, start: float, end: float) -> Callable[[int], float]:
    """The learning-rate factor at each step: ``start`` -> 1 at ``warmup`` (a fraction of
    ``steps``) -> ``end``, linearly; for LambdaLR."""

    def factor(step: int) -> float:
        t = step / max(1, steps)
        if t < warmup:
            return start + (1 - start) * t / warmup
        return 1 - (1 - end) * (t - warmup) / (1 - warmup)

    return factor


class Lookahead:
    """airbench's Lookahead-EMA. Every ``every`` steps the average moves toward the weights by
    ``1 - decay`` and the weights are set to it; ``decay`` rises as (step/total)^3, so it only
    smooths late training. Every rank holds the same weights (or, under FSDP, its shard of them
    and of the average), so every rank stays in step."""

    def __init__(self, model: torch.nn.Module, total_steps: int, every: int = 5) -> None:
        self.model, self.total_steps, self.every = model, total_steps, every
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average, whole (gathered under FSDP: a collective), for a checkpoint."""
        return full_tensors(self.average)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take a checkpoint's average (each rank its shard of it under FSDP)."""
        self.average = shard_like(state, self.model.state_dict())

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, final: bool = False) -> None:
        if not final and step % self.every:
            return
        decay = 1.0 if final else 0.95**self.every * (step / self.total_steps) ** 3
        for name, value in model.state_dict().items():
            if name in self.average:
                self.average[name].lerp_(value, 1 - decay)
                value.copy_(self.average[name])


def orthogonalize(
    update: torch.Tensor, steps: int = 3, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Muon's Newton-Schulz iteration: ``update`` (2-D) with its singular values pushed toward 1.

    The quintic's coefficients maximise the slope at zero (Keller Jordan's Muon): three steps
    leave the singular values roughly in [0.5, 1.5], which trains as well as the exact U V^T.
    Computed in ``dtype``: bf16 as Muon does, or float32 where the run is in float32 (bf16's
    rounding would turn the last-bit differences of ranks' summed gradients into visible ones).
    The result has ``update``'s dtype.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.to(dtype)
    x = x / (x.norm() + eps)  # the largest singular value <= 1
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked ``muon=True`` (conv filters), Nesterov SGD for the others.

    A Muon step (airbench94_muon's): Nesterov momentum on the gradient, the weight tensor
    rescaled to norm sqrt(output channels), then a step of ``lr`` along the orthogonalised
    momentum (``orthogonalize`` of the filters as an out x (in*k*k) matrix), without weight
    decay. The SGD groups step exactly as ``torch.optim.SGD(nesterov=True)`` would. One optimizer
    for both kinds keeps one ``state_dict`` and one LR scheduler with a factor per group.

    Every rank holds the same averaged gradients, so every rank takes the same step. Under FSDP
    each rank holds a shard of each tensor: the arithmetic runs on the local shards (plain
    tensors: no DTensor dispatch per op), and a Muon step gathers the whole filter bank's
    momentum to orthogonalise it (each rank the same matrix), then keeps its own rows; the
    momentum buffers are DTensors like the parameters, so checkpoints gather them as usual.
    """

    def __init__(
        self, groups: list[dict], lr: float, momentum: float, weight_decay: float = 0.0, bf16: bool = True
    ) -> None:
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, muon=False))
        self.dtype = torch.bfloat16 if bf16 else torch.float32  # of the orthogonalisation

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)  # + grad below: its first value
                weight, grad, buffer = local_part(p), local_part(p.grad), local_part(state["momentum_buffer"])
                if not group["muon"]:
                    grad = grad.add(weight, alpha=group["weight_decay"])
                buffer.mul_(momentum).add_(grad)
                direction = grad.add(buffer, alpha=momentum)
                if group["muon"]:
                    if lr == 0:  # also how torch's checkpoint loader creates the state: a step at
                        continue  # lr 0 must leave the weights as they are, unscaled
                    weight.mul_(len(p) ** 0.5 / whole(p.norm()))
                    direction = own_part(
                        p,
                        orthogonalize(whole_from_parts(p, direction).reshape(len(p), -1), dtype=self.dtype).view(
                            p.shape
                        ),
                    )
                weight.add_(direction, alpha=-lr)
