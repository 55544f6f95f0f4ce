"""The non-finite loss check of every training step: no host sync per step, one verdict per job.

A NaN or infinite loss on one rank is soon everyone's problem (DDP averages its gradient into
every replica), but it starts on one rank's batch. Checking it where it happens would stop that
rank alone, and the others would die in their next collective with a traceback. So each rank
records its first bad step on the device (no host sync per step, on a GPU or a CPU), and the
ranks compare what they recorded at the points where they all stop anyway: the end of an epoch
and a pre-emption checkpoint. Then every rank stops with the same line, naming the step and the
rank whose batch it was, before a checkpoint of non-finite weights is written.
"""

from __future__ import annotations

import torch

from common.agree import all_gather_object
from common.dist import DistInfo
from common.errors import NonFiniteLossError


class FiniteLossWatch:
    """``update(loss, step)`` after every forward; ``check()`` on every rank at epoch end."""

    def __init__(self, dist: DistInfo) -> None:
        self.dist = dist
        self.first_step = torch.full((), -1, dtype=torch.int64, device=dist.device)
        self.first_value = torch.zeros((), dtype=torch.float32, device=dist.device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Record ``step`` if ``loss`` is the first non-finite one (on the device, no sync)."""
        bad = ~torch.isfinite(loss.detach()) & (self.first_step < 0)
        self.first_step = torch.where(bad, step, self.first_step)
        self.first_value = torch.where(bad, loss.detach().float(), self.first_value)

    def check(self) -> None:
        """Raise NonFiniteLossError on every rank if any rank saw a non-finite loss; call on
        every rank at the same point (it compares the ranks' records: a collective)."""
        mine = (int(self.first_step), float(self.first_value))
        records = all_gather_object(mine, self.dist)
        bad = sorted((step, rank, value) for rank, (step, value) in enumerate(records) if step >= 0)
        if not bad:
            return
        step, rank, value = bad[0]
        where = ""
        if self.dist.world_size > 1:
            alone = sum(s == step for s, _, _ in bad) == 1
            where = f" on rank {rank}" + (" only (its share of that batch)" if alone else "")
        raise NonFiniteLossError(
            f"loss became {value} at step {step}{where}; check the training data for extreme or "
            "broken values, or, if the loss had been finite and growing, lower --lr"
        )
