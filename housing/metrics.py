"""Housing's test metrics: RMSE, MAE and R^2 in dollars over every sample of a split exactly once."""

from __future__ import annotations

import math
from typing import Any

import torch

from common.data import eval_batches
from common.dist import DistInfo
from common.metrics import gather_tensors, reduce_sums
from housing import data as hdata

EVAL_BATCH = 1024  # samples per rank per evaluation forward pass


@torch.no_grad()
def split_metrics(
    model: torch.nn.Module, split: hdata.Split, data: hdata.HousingData, dist: DistInfo, keep_predictions: bool = False
) -> dict[str, Any]:
    """RMSE / MAE / R^2 in dollars and the log-space loss of ``model`` (a plain float64 copy,
    ``common.parallel.local_copy``) on ``split``, every sample exactly once.

    Each rank predicts its contiguous shard; sums are reduced in float64. With
    ``keep_predictions`` the per-sample dollar predictions come back in split order.
    """
    sums = {"se": 0.0, "ae": 0.0, "y": 0.0, "y2": 0.0, "loss": 0.0, "n": 0}
    parts = []
    for x, y, price in eval_batches([split.x, split.y, split.price], EVAL_BATCH, dist):
        out = model(x.double()).mean(-1)  # the ensemble's prediction
        pred = hdata.decode_target(out, data.target_mean, data.target_std)
        err = pred - price
        sums["se"] += (err**2).sum().item()
        sums["ae"] += err.abs().sum().item()
        sums["y"] += price.sum().item()
        sums["y2"] += (price**2).sum().item()
        sums["loss"] += ((out - y) ** 2).double().sum().item()
        sums["n"] += len(y)
        parts.append(pred)
    t = reduce_sums(sums, dist)
    n = t["n"]
    total_ss = t["y2"] - t["y"] ** 2 / n
    result: dict[str, Any] = {
        "rmse": math.sqrt(t["se"] / n),
        "mae": t["ae"] / n,
        "r2": 1 - t["se"] / total_ss,
        "loss": t["loss"] / n,
        "n": int(n),
    }
    if keep_predictions:
        local = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        result["predictions"] = gather_tensors(local, dist)
    return result
