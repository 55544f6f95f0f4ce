"""A configurable feed-forward regressor: depth x width hidden layers, one output (log price)."""
from __future__ import annotations

import torch
from torch import nn

from common.errors import UserError

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
# No BatchNorm: its statistics come from each rank's share of the batch, so the result would
# depend on the number of processes. LayerNorm normalises each sample on its own.
NORMS = {"none": None, "layer": nn.LayerNorm}


class MLP(nn.Module):
    """``[Linear -> norm -> activation -> dropout] * depth -> Linear(width, 1)``."""

    def __init__(self, n_features: int, width: int = 256, depth: int = 3, activation: str = "silu",
                 dropout: float = 0.0, norm: str = "none") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UserError(f"--activation {activation!r}: choose from {', '.join(ACTIVATIONS)}")
        if norm not in NORMS:
            raise UserError(f"--norm {norm!r}: choose from {', '.join(NORMS)}")
        layers: list[nn.Module] = []
        size = n_features
        for _ in range(depth):
            layers.append(nn.Linear(size, width))
            if NORMS[norm] is not None:
                layers.append(NORMS[norm](width))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            size = width
        layers.append(nn.Linear(size, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, n_features] -> [batch] predictions of the standardised log price."""
        # A copy, not the squeezed view: FSDP2 warns on every step when a sharded module returns
        # a view (an in-place op on it would skip the backward all-gather). One float a sample.
        return self.net(x).squeeze(-1).clone()


def describe(width: int, depth: int, activation: str, dropout: float, norm: str) -> str:
    """A short architecture tag, stored in checkpoints so a mismatched --resume is refused."""
    return f"mlp-{depth}x{width}-{activation}-{norm}-drop{dropout:g}"
