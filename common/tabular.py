"""A tabular network: numeric features -> an MLP -> k ensemble members' outputs.

housing regresses the standardised log price with it (``housing.train.build_model``); anomaly's
classifier predicts attack logits with it (``anomaly.model.Classifier``). Three optional
ingredients from the tabular deep-learning literature, each a flag:

- ``quantile``: every input feature mapped through its training-split quantiles to a standard
  normal (what scikit-learn's ``QuantileTransformer(output_distribution="normal")`` does), so
  skewed or heavy-tailed features arrive evenly spread.
- ``embedding``: each scalar feature becomes a small vector before the MLP (Gorishniy et al.,
  "On Embeddings for Numerical Features in Tabular Deep Learning", 2022): ``ple``,
  piecewise-linear encoding over bins cut at the training quantiles, or ``periodic``, sin/cos of
  learned frequencies; both then a per-feature linear layer and ReLU.
- ``ensemble`` k > 1 (Gorishniy et al., "TabM", 2024): k members in one model, one forward pass
  computes all k predictions; each is trained on its own loss, the prediction is their mean.
  ``mini`` (TabM-mini): the members share the MLP's weights except a random-sign multiplicative
  adapter on its input and their own output head. ``packed``: k independent MLPs, batched (the
  embedding is shared either way).

Fitted state (quantiles, bin edges) lives in buffers, so it is saved and restored with the
weights and follows ``.double()``; nothing here depends on other samples of the batch, so a
prediction is the same whichever rank or batch computes it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.errors import UserError

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
# No BatchNorm: its statistics come from each rank's share of the batch, so the result would
# depend on the number of processes. LayerNorm normalises each sample on its own.
NORMS = {"none": None, "layer": nn.LayerNorm}
EMBEDDINGS = ("none", "ple", "periodic")
ENSEMBLE_MODES = ("mini", "packed")
QUANTILES = 256  # grid points of the quantile transform (scikit-learn's default is 1000)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Per-feature ``numpy.interp``: x [batch, f], xp [f, n] increasing, fp [n]."""
    xt = x.t().contiguous()  # [f, batch]: searchsorted wants the sorted dim innermost
    i = (torch.searchsorted(xp, xt, right=True) - 1).clamp(0, xp.shape[1] - 2)
    lo, hi = xp.gather(1, i), xp.gather(1, i + 1)
    t = ((xt - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    return (fp[i] + t * (fp[i + 1] - fp[i])).t()


class QuantileNormal(nn.Module):
    """x -> Phi^-1(empirical CDF of x on the training rows), per feature, clipped to +-5.2.

    Ties (one-hot columns, repeated values) take the mean of the lower and upper interpolation,
    as scikit-learn does, so a constant run of values maps to the middle of its quantile range;
    unlike scikit-learn, that holds for the smallest and largest values too (it sends them to
    -5.2 and +5.2, so a 0/1 column would become -5.2/+5.2).
    """

    def __init__(self, train_x: torch.Tensor | None, n_features: int, n_quantiles: int = QUANTILES):
        super().__init__()
        levels = torch.linspace(0, 1, n_quantiles)
        q = (
            torch.zeros(n_features, n_quantiles)
            if train_x is None
            else torch.quantile(train_x.double().t(), levels.double(), dim=1).t().float()
        )
        self.register_buffer("quantiles", q.contiguous())  # [f, n], fitted on training rows
        self.register_buffer("levels", levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = _interp(x, self.quantiles, self.levels)
        down = 1 - _interp(-x, (-self.quantiles).flip(1), self.levels)
        u = (0.5 * (up + down)).clamp(1e-7, 1 - 1e-7)
        return (math.sqrt(2) * torch.erfinv(2 * u - 1)).clamp(-5.2, 5.2)


class GroupedLinear(nn.Module):
    """``n`` independent ``Linear(d_in, d_out)``, one per slot of the middle dimension:
    [b, n, d_in] -> [b, n, d_out]. One per feature in the embeddings, one per ensemble member in
    TabM-packed."""

    def __init__(self, n: int, d_in: int, d_out: int):
        super().__init__()
        bound = 1 / math.sqrt(d_in)
        self.weight = nn.Parameter(torch.empty(n, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, d_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bni,nio->bno", x, self.weight) + self.bias


class PiecewiseLinear(nn.Module):
    """PLE: feature value -> [0..1] fill level of each of ``n_bins`` quantile bins -> linear -> ReLU.

    Bin t's code is ``clamp((x - e_t) / (e_{t+1} - e_t), 0, 1)`` with edges e at the training
    quantiles; the first bin is open below and the last above, so values outside the training
    range extrapolate linearly. A bin of zero width (a binary column) becomes a step.
    """

    def __init__(self, train_x: torch.Tensor | None, n_features: int, n_bins: int, dim: int):
        super().__init__()
        levels = torch.linspace(0, 1, n_bins + 1).double()
        edges = (
            torch.zeros(n_features, n_bins + 1)
            if train_x is None
            else torch.quantile(train_x.double().t(), levels, dim=1).t().float()
        )
        self.register_buffer("edges", edges.contiguous())  # [f, n_bins + 1]
        self.linear = GroupedLinear(n_features, n_bins, dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, f] -> [batch, f, n_bins] fill levels."""
        left, width = self.edges[:, :-1], (self.edges[:, 1:] - self.edges[:, :-1]).clamp_min(1e-6)
        fill = (x.unsqueeze(-1) - left) / width  # [b, f, n_bins]
        n = fill.shape[-1]
        # first bin unbounded below, last unbounded above, the rest clipped to [0, 1]
        lower = torch.zeros(n, dtype=x.dtype, device=x.device)
        upper = torch.ones(n, dtype=x.dtype, device=x.device)
        lower[0], upper[-1] = -math.inf, math.inf
        return fill.clamp_(lower, upper)  # in place: one pass instead of minimum then maximum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(self.encode(x)))


class Periodic(nn.Module):
    """x -> [cos(2 pi c x), sin(2 pi c x)] with k learned frequencies c ~ N(0, sigma) -> linear -> ReLU."""

    def __init__(self, n_features: int, k: int, dim: int, sigma: float = 0.1):
        super().__init__()
        self.frequencies = nn.Parameter(torch.randn(n_features, k) * sigma)
        self.linear = GroupedLinear(n_features, 2 * k, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = 2 * math.pi * self.frequencies * x.unsqueeze(-1)  # [b, f, k]
        return torch.relu(self.linear(torch.cat([torch.cos(v), torch.sin(v)], dim=-1)))


@dataclass(frozen=True)
class TabularArch:
    """The network's shape and its optional ingredients (see the module's docstring)."""

    width: int = 256  # hidden units per layer
    depth: int = 3  # hidden layers
    activation: str = "silu"
    dropout: float = 0.0
    norm: str = "none"
    quantile: bool = False
    embedding: str = "none"  # none, ple, periodic
    embed_bins: int = 16  # PLE bins / periodic frequencies per feature
    embed_dim: int = 8  # embedding size per feature
    ensemble: int = 1  # k members
    ensemble_mode: str = "mini"  # mini or packed

    @classmethod
    def of(cls, config: Any) -> TabularArch:
        """The fields of ``config`` (a program's Config) that have these names."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def check(self) -> None:
        """UserError naming the flag when a choice is not one this module has."""
        if self.activation not in ACTIVATIONS:
            raise UserError(f"--activation {self.activation!r}: choose from {', '.join(ACTIVATIONS)}")
        if self.norm not in NORMS:
            raise UserError(f"--norm {self.norm!r}: choose from {', '.join(NORMS)}")
        if self.embedding not in EMBEDDINGS:
            raise UserError(f"--embedding {self.embedding!r}: choose from {', '.join(EMBEDDINGS)}")
        if self.ensemble_mode not in ENSEMBLE_MODES:
            raise UserError(f"--ensemble-mode {self.ensemble_mode!r}: choose from {', '.join(ENSEMBLE_MODES)}")
        if self.ensemble < 1 or self.embed_bins < 1 or self.embed_dim < 1:
            raise UserError("--ensemble, --embed-bins and --embed-dim must be >= 1")

    @property
    def tag(self) -> str:
        """A short architecture tag, stored in checkpoints so a mismatched --resume is refused."""
        tag = f"mlp-{self.depth}x{self.width}-{self.activation}-{self.norm}-drop{self.dropout:g}"
        if self.quantile:
            tag += "-quantile"
        if self.embedding != "none":
            tag += f"-{self.embedding}{self.embed_bins}x{self.embed_dim}"
        # Always a member count: checkpoints from before the output heads became parameters of
        # their own have a tag without it, so --resume refuses them instead of failing to load.
        tag += f"-{self.ensemble_mode}{self.ensemble}" if self.ensemble > 1 else "-k1"
        return tag


class TabularMLP(nn.Module):
    """``[inputs] -> [Linear -> norm -> activation -> dropout] * depth -> k heads``.

    ``forward`` returns [batch, k]: one output per ensemble member (k = 1 is a plain MLP): a
    regression target or a logit. Train each column against the target; predict their mean.
    ``train_x`` (the training split's features) fits the quantile transform and the PLE bins;
    leave it None when the weights and buffers will be loaded from a checkpoint.
    """

    def __init__(
        self,
        n_features: int,
        arch: TabularArch | None = None,
        *,
        plain: tuple[int, ...] = (),
        train_x: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        arch = arch or TabularArch()
        arch.check()
        embedding, width = arch.embedding, arch.width
        if train_x is not None:
            train_x = train_x.detach().cpu()
        self.quantile = QuantileNormal(train_x, n_features) if arch.quantile else None
        if self.quantile is not None and train_x is not None:
            train_x = self.quantile(train_x.float())  # PLE bins cut in the space it sees
        self.embed: nn.Module | None = None
        size = n_features
        # ``plain`` columns (0/1 indicators: a piecewise-linear code of one is a step the first
        # layer draws anyway) skip the embedding and join its output as they are.
        self.split = bool(plain) and embedding != "none"
        if self.split:
            skipped = set(plain)
            embedded = [i for i in range(n_features) if i not in skipped]
            self.register_buffer("embedded_index", torch.tensor(embedded, dtype=torch.long))
            self.register_buffer("plain_index", torch.tensor(sorted(plain), dtype=torch.long))
            if train_x is not None:
                train_x = train_x[:, self.embedded_index]
            n_embedded = len(embedded)
        else:
            n_embedded = n_features
        if embedding == "ple":
            self.embed = PiecewiseLinear(train_x, n_embedded, arch.embed_bins, arch.embed_dim)
        elif embedding == "periodic":
            self.embed = Periodic(n_embedded, arch.embed_bins, arch.embed_dim)
        if self.embed is not None:
            size = n_embedded * arch.embed_dim + (n_features - n_embedded)
        ensemble = self.ensemble = arch.ensemble
        self.packed = ensemble > 1 and arch.ensemble_mode == "packed"
        # TabM-mini's adapter: member i sees its input multiplied element-wise by r_i, random
        # signs at initialisation (TabM's choice), so the members start out different.
        self.adapter = (
            nn.Parameter(torch.randint(0, 2, (ensemble, size)).float() * 2 - 1)
            if ensemble > 1 and not self.packed
            else None
        )
        layers: list[nn.Module] = []
        for _ in range(arch.depth):
            layers.append(GroupedLinear(arch.ensemble, size, width) if self.packed else nn.Linear(size, width))
            if NORMS[arch.norm] is not None:
                layers.append(NORMS[arch.norm](width))
            layers.append(ACTIVATIONS[arch.activation]())
            if arch.dropout > 0:
                layers.append(nn.Dropout(arch.dropout))
            size = width
        self.net = nn.Sequential(*layers)
        bound = 1 / math.sqrt(size)
        self.head_weight = nn.Parameter(torch.empty(ensemble, size).uniform_(-bound, bound))
        self.head_bias = nn.Parameter(torch.empty(ensemble).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, n_features] -> [batch, k]: each member's output."""
        if self.quantile is not None:
            x = self.quantile(x)
        if self.split:
            x = torch.cat([self.embed(x[:, self.embedded_index]).flatten(1), x[:, self.plain_index]], dim=1)
        elif self.embed is not None:
            x = self.embed(x).flatten(1)
        if self.adapter is not None and len(self.net) > 0:
            h = self.net[1:](self._first_layer_mini(x))
        else:
            x = x.unsqueeze(1)  # [batch, 1, size]: one row of members, broadcast below
            if self.adapter is not None:
                x = x * self.adapter  # [batch, k, size]
            elif self.packed:
                x = x.expand(-1, self.ensemble, -1)
            h = self.net(x)
        # Multiply-and-sum rather than einsum: einsum's gradient for a [1, width] weight has
        # strides DDP's gradient buckets do not expect (a UserWarning on every step).
        return (h * self.head_weight).sum(-1) + self.head_bias

    def _first_layer_mini(self, x: torch.Tensor) -> torch.Tensor:
        """TabM-mini's first layer, member i computing ``(x * r_i) @ W.T + b``: [batch, size] -> [batch, k, width].

        The same products as multiplying the input by each adapter and then applying the shared
        layer, with the adapters folded into k copies of the (small) weight instead of k copies
        of the (large) batch of inputs: one matrix product [batch, size] x [size, k * width].
        docs/housing-tuning.md gives the time this saves.
        """
        first = self.net[0]
        weight = self.adapter.unsqueeze(-1) * first.weight.t()  # [k, size, width]
        k, size, width = weight.shape
        h = x @ weight.transpose(0, 1).reshape(size, k * width)
        return h.view(-1, k, width) + first.bias
