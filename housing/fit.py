"""Training without a run directory, for the searches (housing/tune.py, housing/features.py):
``train``'s epoch loop without checkpoints, records or pre-emption, the best weights restored."""

from __future__ import annotations

import torch

from common.dist import DistInfo
from common.parallel import local_copy
from common.preempt import EpochProgress
from housing import data as hdata
from housing.metrics import split_metrics
from housing.train import Config, EarlyStopping, build_training, train_one_epoch


def this_process_only(dist: DistInfo) -> DistInfo:
    """A world of one on this rank's device: for training independent models per rank."""
    return DistInfo(rank=0, local_rank=dist.local_rank, world_size=1, local_world_size=1, device=dist.device)


def fit(cfg: Config, data: hdata.HousingData, dist: DistInfo) -> tuple[torch.nn.Module, EarlyStopping]:
    """Train from scratch with early stopping on validation RMSE; the best weights restored."""
    training = build_training(cfg, data, dist)
    stopper = EarlyStopping(cfg.patience)
    for epoch in range(cfg.epochs):
        train_one_epoch(cfg, training, EpochProgress(epoch), dist)
        val = split_metrics(local_copy(training.model).double().eval(), data.val, data, dist)
        if stopper.update(val["rmse"], epoch, training.model):
            break
    stopper.restore_best(training.model)
    return training.model, stopper
