"""cifar/train.py's schedule and airbench's Lookahead-EMA of the weights."""
from __future__ import annotations

from typing import Callable

import torch


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
        self.total_steps, self.every = total_steps, every
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items()
                        if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, final: bool = False) -> None:
        if not final and step % self.every:
            return
        decay = 1.0 if final else 0.95**self.every * (step / self.total_steps) ** 3
        for name, value in model.state_dict().items():
            if name in self.average:
                self.average[name].lerp_(value, 1 - decay)
                value.copy_(self.average[name])
