"""Housing's training loss: the MSE of the standardised log price, plus the error in dollars."""

from __future__ import annotations

import math

import torch

from housing import data as hdata

DOLLAR_UNIT = 1e5  # the dollar term measures errors in $100k: the same order as the log-space MSE


def loss_fn(
    out: torch.Tensor, y: torch.Tensor, dollar_weight: float = 0.0, target_stats: tuple[float, float] = (0.0, 1.0)
) -> torch.Tensor:
    """Mean squared error of every ensemble member's prediction ([batch, k]) against y ([batch]).

    Each member is trained on its own error, not the ensemble mean's, as in TabM: the members
    stay diverse, which is what averaging them gains from.

    ``dollar_weight`` > 0 adds that many times the squared error in dollars (in units of
    $100k, predictions clipped to the file's range as ``decode_target`` does). The log-space
    MSE alone aims at the conditional median of the price, and weighs a $20k miss on a $100k
    house like a $100k miss on a $500k one; the test metric is RMSE in dollars, whose best
    prediction is the conditional mean. The log term keeps cheap houses' errors in view and the
    early steps well conditioned. ``target_stats`` = (mean, std) of the log price.
    """
    target = y.unsqueeze(-1).expand_as(out)
    loss = torch.nn.functional.mse_loss(out, target)
    if dollar_weight > 0:
        mean, std = target_stats
        low, high = math.log(hdata.PRICE_MIN), math.log(hdata.PRICE_CAP)
        pred = torch.exp((out * std + mean).clamp(low, high)) / DOLLAR_UNIT
        loss = loss + dollar_weight * torch.nn.functional.mse_loss(pred, torch.exp(target * std + mean) / DOLLAR_UNIT)
    return loss
