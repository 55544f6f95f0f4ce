"""Random state: seed every generator once, capture and restore them for exact resumes."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) with the same value on every rank.

    The same seed everywhere makes model initialisation identical across ranks (DDP also
    broadcasts rank 0's weights, but other programs' code paths should not rely on that).
    Data order is seeded separately by ``TrainBatches`` from ``seed + epoch``.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng(device: torch.device, plain: bool = False) -> dict[str, Any]:
    """Every random generator this process uses, so a resumed run draws the same numbers.

    ``plain``: NumPy's key as a tensor, the form a checkpoint holds (it loads with
    ``weights_only=True``, which refuses NumPy arrays).

    ``device`` is this rank's device: of the GPUs only its generator is saved. Saving every
    visible GPU's would tie the checkpoint to this node's GPU count and visibility (a job moved
    from 8 GPUs a node to 4, or to one visible GPU per process, could not restore it), and on a
    CPU run it would initialise CUDA for nothing.
    """
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if plain:
        name, key, pos, has_gauss, cached = state["numpy"]
        state["numpy"] = (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of ``capture_rng`` (either form): this rank's generators, its own GPU's included."""
    name, key, pos, has_gauss, cached = state["numpy"]
    if isinstance(key, torch.Tensor):  # the plain form
        key = key.numpy().astype(np.uint32)
    random.setstate(state["python"])
    np.random.set_state((name, key, pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
