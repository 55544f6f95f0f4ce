"""The autoencoder and its anomaly score.

The network sees scaled features ``x`` (``anomaly.features``), rotates them into PCA space with a
fixed projection (``z = (x - mean) @ W.T``, stored as buffers so the checkpoint is self-contained),
encodes and decodes ``z``, and maps the result back (``x_hat = z_hat @ W + mean``). The anomaly
score is the mean squared error over *all* scaled features, so the part of ``x`` that PCA dropped
(the residual, where unusual flows often differ) counts too:

    score(x) = mean_j w_j * (x_j - x_hat_j)^2

``w`` (buffer ``error_weight``) is 1 by default; ``--score normalized`` sets it after training to
1 / (mean squared error of feature j on normal *validation* rows), so a feature the model always
reconstructs well weighs more when it suddenly does not.
"""
from __future__ import annotations

import torch
from torch import nn


class Autoencoder(nn.Module):
    """MLP autoencoder working in PCA space; ``forward`` returns the reconstruction of ``x``."""

    def __init__(self, pca_mean: torch.Tensor, pca_components: torch.Tensor,
                 hidden: tuple[int, ...] = (128, 64, 16), dropout: float = 0.0) -> None:
        super().__init__()
        n_features = pca_components.shape[1]
        n_components = pca_components.shape[0]
        self.register_buffer("pca_mean", pca_mean.clone().float())
        self.register_buffer("pca_components", pca_components.clone().float())
        self.register_buffer("error_weight", torch.ones(n_features))
        widths = [n_components, *hidden]
        encoder: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            encoder.append(nn.Linear(a, b))
            if i < len(hidden) - 1:  # the code layer stays linear
                encoder += [nn.GELU(), nn.Dropout(dropout)]
        decoder: list[nn.Module] = []
        back = widths[::-1]
        for i, (a, b) in enumerate(zip(back[:-1], back[1:])):
            decoder.append(nn.Linear(a, b))
            if i < len(hidden) - 1:
                decoder += [nn.GELU(), nn.Dropout(dropout)]
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.pca_mean) @ self.pca_components.T
        return self.decoder(self.encoder(z)) @ self.pca_components + self.pca_mean

    def feature_errors(self, x: torch.Tensor) -> torch.Tensor:
        """Squared error per sample and scaled feature, (n, n_features)."""
        return (self(x) - x) ** 2

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly score per sample: weighted mean squared reconstruction error."""
        return (self.feature_errors(x) * self.error_weight).mean(dim=1)
