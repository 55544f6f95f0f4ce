"""The three detectors: an autoencoder, a classifier, and the hybrid of both.

- ``Autoencoder`` (semi-supervised): trained on normal rows only; flags what it cannot
  reconstruct, including attacks of a kind no label has shown.
- ``Classifier`` (supervised): a tabular network (``common.tabular``: piecewise-linear feature
  embeddings, k TabM-mini members) from features to an attack probability, trained on every
  labelled training row; catches the attacks it was shown.
- ``Hybrid``: both in one module, trained together (the loss is the sum of the two; their
  parameters are disjoint, so each part learns exactly what it would alone). A row is an attack
  if the classifier says so, *or* the classifier's members disagree on it (a row unlike those
  it was taught), *or* the autoencoder finds it unlike normal traffic.

Every detector exposes ``raw_scores(x)``: one column per part (``PARTS``: classifier
probability, members' disagreement, reconstruction error). ``calibrate`` (``anomaly.metrics``)
picks one threshold per column on validation; the final score is ``max_j raw_j / threshold_j``
and a row is flagged at >= 1.

The autoencoder:

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

from anomaly.features import COUNTED, FeatureTransform
from common.errors import UserError
from common.tabular import TabularArch, TabularMLP


class Autoencoder(nn.Module):
    """MLP autoencoder working in PCA space; ``forward`` returns the reconstruction of ``x``."""

    def __init__(
        self,
        pca_mean: torch.Tensor,
        pca_components: torch.Tensor,
        hidden: tuple[int, ...] = (128, 64, 16),
        dropout: float = 0.0,
    ) -> None:
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


class Classifier(nn.Module):
    """``common.tabular.TabularMLP`` from the scaled features in ``input_index`` to k attack
    logits, one per ensemble member; the attack probability is the members' mean probability.

    The numeric features enter through piecewise-linear embeddings (bins cut at the training
    quantiles, like a tree's splits) and k TabM-mini members share one MLP: the parts that let
    housing's network beat gradient boosting (``--embedding``, ``--ensemble``).

    ``input_index`` lets it skip the exact-size frequency columns: they count normal *training*
    flows, so for a model trained on those same flows they act as a memory of its training rows
    (measured: gradient boosting's test F1 0.857 with them, 0.976 without).
    ``plain``: positions in ``input_index`` of the one-hot columns, which skip the embedding.
    ``train_x`` (every scaled feature of the training rows) fits the embedding's bins; leave it
    None when weights and buffers come from a checkpoint.
    """

    def __init__(
        self,
        input_index: torch.Tensor,
        hidden: tuple[int, ...] = (128, 128, 128),
        dropout: float = 0.1,
        *,
        embedding: str = "ple",
        embed_bins: int = 96,
        embed_dim: int = 8,
        ensemble: int = 8,
        plain: tuple[int, ...] = (),
        train_x: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if len(set(hidden)) != 1:
            raise UserError(
                f"--classifier-hidden {','.join(map(str, hidden))}: the layers of the "
                "classifier share one width (for example 256,256)"
            )
        self.register_buffer("input_index", input_index.clone().long())
        arch = TabularArch(
            width=hidden[0],
            depth=len(hidden),
            activation="gelu",
            dropout=dropout,
            embedding=embedding,
            embed_bins=embed_bins,
            embed_dim=embed_dim,
            ensemble=ensemble,
        )
        self.net = TabularMLP(
            len(input_index),
            arch,
            plain=plain,
            train_x=None if train_x is None else train_x[:, input_index],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, features] -> [batch, k] logits."""
        return self.net(x[:, self.input_index])

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """The attack probability of each row: the mean of the members' probabilities."""
        return torch.sigmoid(self(x)).mean(dim=1)

    def probability_and_disagreement(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attack probability and the members' disagreement: the standard deviation of their
        probabilities (0 with one member).

        The members share most weights and agree on rows like those they were trained on; a
        row of a kind no label has shown leaves them free to differ. On a held-out attack
        category this flags more of it than the autoencoder at fewer false alarms
        (docs/anomaly-experiments.md, Novel attacks)."""
        members = torch.sigmoid(self(x))
        return members.mean(dim=1), members.std(dim=1, correction=0)


class Hybrid(nn.Module):
    """An ``Autoencoder`` and a ``Classifier`` side by side; ``forward`` returns both outputs."""

    def __init__(self, autoencoder: Autoencoder, classifier: Classifier) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier(x), self.autoencoder(x)


# The parts of each detector, in the order of raw_scores' columns.
PARTS = {
    "autoencoder": ("autoencoder",),
    "classifier": ("classifier",),
    "hybrid": ("classifier", "disagreement", "autoencoder"),
}
# Parts that watch for what no label has shown: beside a classifier their thresholds come from
# a false-alarm budget (--novelty-alarms), not from validation F1.
NOVELTY_PARTS = ("disagreement", "autoencoder")


def training_loss(detector: str, out, x: torch.Tensor, y: torch.Tensor, normal_share: float) -> torch.Tensor:
    """Mean loss over this rank's rows (so ``TrainBatches.global_mean`` applies).

    The classifier's k members each learn from their own binary cross-entropy (their mean over
    members and rows). The autoencoder learns from normal rows only: alone it is only given
    those; in the hybrid its squared error is masked to the normal rows and divided by their
    share of the training set, so it keeps the scale of a mean over normal rows while staying a
    mean over *all* rows of the batch, which is what makes the gradient exact whatever the
    ranks' shares.
    """
    if detector == "autoencoder":
        return nn.functional.mse_loss(out, x)
    if detector == "classifier":
        return _members_bce(out, y)
    logits, recon = out
    normal = (y == 0).float()
    reconstruction = (((recon - x) ** 2).mean(dim=1) * normal).mean() / normal_share
    return _members_bce(logits, y) + reconstruction


def _members_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each member's [batch, k] logits against the labels, averaged."""
    return nn.functional.binary_cross_entropy_with_logits(logits, y.to(logits.dtype)[:, None].expand_as(logits))


def raw_scores(detector: str, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n, parts) scores of a plain (unwrapped) network, one column per part in ``PARTS``."""
    if detector == "autoencoder":
        return net.score(x)[:, None]
    if detector == "classifier":
        return net.probability(x)[:, None]
    return torch.stack([*net.classifier.probability_and_disagreement(x), net.autoencoder.score(x)], dim=1)


def combined_score(raw: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``max_j raw_j / threshold_j``: a row is flagged when it reaches 1 in any part."""
    # A zero threshold would divide by zero; the smallest positive number flags the same rows.
    return (raw / thresholds.clamp(min=torch.finfo(thresholds.dtype).tiny)).max(dim=1).values


def classifier_inputs(transform: FeatureTransform) -> list[int]:
    """The feature columns a supervised model reads: all but the exact-size frequencies (see
    ``Classifier``)."""
    return [i for i, name in enumerate(transform.feature_names) if name not in COUNTED]


def make_detector(
    detector: str,
    transform: FeatureTransform,
    hidden: tuple[int, ...],
    classifier_hidden: tuple[int, ...],
    classifier_options: dict,
    train_x: torch.Tensor | None = None,
) -> torch.nn.Module:
    """Build a detector network (also used by ``anomaly.predict`` to load ``detector.pt``).

    ``classifier_options``: the classifier's ``embedding``, ``embed_bins``, ``embed_dim`` and
    ``ensemble``; ``train_x``, the training rows' features, fits its embedding (None: the
    buffers come from a checkpoint)."""
    mean, components = transform.pca_tensors()
    autoencoder = Autoencoder(torch.from_numpy(mean), torch.from_numpy(components), hidden)
    inputs, indicators = classifier_inputs(transform), set(transform.indicator_columns())
    plain = tuple(position for position, column in enumerate(inputs) if column in indicators)
    classifier = Classifier(torch.tensor(inputs), classifier_hidden, plain=plain, train_x=train_x, **classifier_options)
    return {"autoencoder": autoencoder, "classifier": classifier, "hybrid": Hybrid(autoencoder, classifier)}[detector]


def thresholds_tensor(parts: tuple[str, ...], thresholds: dict[str, float]) -> torch.Tensor:
    """``thresholds`` in the order of ``parts`` (raw_scores' columns), for ``combined_score``."""
    return torch.tensor([thresholds[part] for part in parts], dtype=torch.float64)


def parse_widths(flag: str, text: str) -> tuple[int, ...]:
    """Layer widths from a command line's ``128,64,16``; UserError naming ``flag`` otherwise."""
    try:
        widths = tuple(int(h) for h in text.split(","))
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers like 128,64,16") from None
    if not widths or min(widths) <= 0:
        raise UserError(f"{flag} {text!r}: widths must be positive integers")
    return widths
