"""The networks' scores and losses over every row of a split, in float64, exact at any world size.

Each rank scores its contiguous shard of the rows with a plain copy of the model
(``local_copy``: whole under FSDP, so the forward runs no collectives); the results are
gathered in row order or reduced as sums.
"""

from __future__ import annotations

import torch

from anomaly.model import PARTS, Autoencoder, raw_scores, training_loss
from common.data import eval_batches, fixed_chunks
from common.dist import DistInfo
from common.metrics import all_reduce_tensor, gather_tensors, reduce_sums
from common.parallel import local_copy

EVAL_BATCH = 4096  # rows per rank per batch of a loss or error sum
SCORE_CHUNK = 256  # rows per scoring batch, the same at any world size (common.data.fixed_chunks)


def autoencoder_part(net: torch.nn.Module) -> Autoencoder | None:
    return net if isinstance(net, Autoencoder) else getattr(net, "autoencoder", None)


def validation_loss(
    model, x: torch.Tensor, y: torch.Tensor, dist: DistInfo, detector: str, normal_share: float
) -> float:
    """The training loss on validation rows (normal ones only for the autoencoder), exact."""
    if detector == "autoencoder":
        x, y = x[y == 0], y[y == 0]
    net = local_copy(model).eval()  # plain: scores each shard alone
    sums = {"loss": 0.0, "n": 0}
    with torch.no_grad():
        for xb, yb in eval_batches([x, y], EVAL_BATCH, dist):
            sums["loss"] += training_loss(detector, net(xb), xb, yb, normal_share).item() * len(xb)
            sums["n"] += len(xb)
    totals = reduce_sums(sums, dist)
    return totals["loss"] / max(totals["n"], 1)


def score_rows(model, x: torch.Tensor, dist: DistInfo, detector: str) -> torch.Tensor:
    """Raw scores (rows, parts) of every row of ``x`` in original order, on every rank.

    Scored in float64, in the fixed chunks of ``SCORE_CHUNK`` rows that ``fixed_chunks`` deals
    out (each padded to that size), and gathered: every row is computed in the same batch at any
    world size, so the scores (and all metrics derived from them) are bit-identical however
    many ranks share the work.
    """
    net = local_copy(model).double().eval()  # plain: scores each shard alone, no collectives
    parts = []
    with torch.no_grad():
        for rows in fixed_chunks(len(x), SCORE_CHUNK, dist):
            parts.append(chunk_scores(detector, net, x[rows].to(dist.device, torch.float64)))
    local = torch.cat(parts) if parts else torch.zeros(0, len(PARTS[detector]), dtype=torch.float64)
    return gather_tensors(local, dist)


def chunk_scores(detector: str, net: torch.nn.Module, xb: torch.Tensor) -> torch.Tensor:
    """``raw_scores`` of at most ``SCORE_CHUNK`` rows, computed as a batch of exactly that many
    (zero rows appended, their scores dropped): the shape, and so the kernels, never vary."""
    padded = torch.cat([xb, xb.new_zeros(SCORE_CHUNK - len(xb), *xb.shape[1:])])
    return raw_scores(detector, net, padded)[: len(xb)]


def normal_feature_error(model, x: torch.Tensor, y: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """The autoencoder's mean squared error per feature over the normal rows of ``x`` (exact)."""
    net = autoencoder_part(local_copy(model)).double().eval()  # plain: scores each shard alone
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=dist.device)
    count = torch.zeros(1, dtype=torch.float64, device=dist.device)
    with torch.no_grad():
        for xb, yb in eval_batches([x, y], EVAL_BATCH, dist):
            normal = xb[yb == 0].double()
            total += net.feature_errors(normal).sum(dim=0)
            count += len(normal)
    total = all_reduce_tensor(total, dist)
    count = all_reduce_tensor(count, dist)
    return total / count.clamp(min=1)
