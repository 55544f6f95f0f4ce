"""Batches reach the model's device by construction, in every program (no GPU needed).

Each program trains one epoch and evaluates with ``dist.device`` set to ``meta`` while its data
starts on the CPU, as it does on a GPU box (model on ``cuda:LOCAL_RANK``, data read into host
memory). The meta device computes shapes only and refuses to mix with any other device
("Tensor on device meta is not on the expected device cpu"), so a batch, a target or an
accumulator that a code path forgot to place fails here exactly where it would fail on a GPU.
A meta run ends at the first read of a value (``.item()``, ``.cpu()``): reaching that read
after the forward (and, in training, the backward) ran is the pass condition.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from common.dist import DistInfo
from common.preempt import EpochProgress

META = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("meta"))
# The only way a meta run may stop: reading a number out of a (correctly placed) meta tensor.
VALUE_READ = re.compile(r"cannot be called on meta tensors|Cannot copy out of meta tensor")


@contextmanager
def runs_on_meta(model: torch.nn.Module | None = None):
    """Expect the block to stop at a value read, after module forwards ran; with ``model``,
    after its backward too (its parameters hold gradients)."""
    forwards = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: forwards.append(type(module).__name__))
    # Boolean-mask indexing has no shape on meta; let it assume every row is kept.
    import torch.fx.experimental._config as fx_config
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)
        try:
            with pytest.raises((RuntimeError, NotImplementedError), match=VALUE_READ):
                yield
        finally:
            hook.remove()
    assert forwards, "no module ran forward on the meta device"
    if model is not None:
        assert any(p.grad is not None for p in model.parameters()), "no backward ran"


def test_housing_trains_and_evaluates_on_the_model_device(tmp_path: Path):
    from housing import train as h
    from tests.test_housing import TRAIN_ARGS, synthetic_frame

    synthetic_frame().to_csv(tmp_path / "housing.csv", index=False)
    cfg = h.parse_args(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run"), *TRAIN_ARGS])
    data = h.build_data(cfg, META)
    model, optimizer, scheduler, batches = h.prepare(cfg, data, META)
    assert next(model.parameters()).device.type == "meta"
    with runs_on_meta(model):
        h.train_one_epoch(model, batches, optimizer, scheduler, EpochProgress(0), META)
    with runs_on_meta():
        h.evaluate(model, data.val, data, META)


def test_anomaly_trains_and_scores_on_the_model_device(tmp_path: Path):
    from anomaly import train as a
    from anomaly.data import TRAIN_FILE
    from anomaly.synthetic import make_partition, write_partition
    from common.data import TrainBatches
    from common.parallel import wrap_model
    from tests.test_anomaly_train import FAST

    write_partition(make_partition(600, seed=1), tmp_path / TRAIN_FILE)
    cfg = a.parse_args(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run"), *FAST])
    data = a.build_data(cfg, META)
    for detector in ("autoencoder", "hybrid"):  # hybrid: the classifier's path too
        cfg = a.parse_args(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run"), *FAST,
                            "--detector", detector])
        model = wrap_model(a.build_model(cfg, data), META)
        batches = TrainBatches(list(data.training_rows(detector)), cfg.batch_size, META, cfg.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, foreach=True)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=len(batches))
        with runs_on_meta(model):
            a.train_one_epoch(model, batches, optimizer, scheduler, EpochProgress(0), META, detector, 0.5)
        with runs_on_meta():
            a.score_rows(model, data.x["val"], META, detector)
        with runs_on_meta():
            a.normal_feature_error(model, data.x["val"], data.y["val"], META)


def test_cifar_trains_and_evaluates_on_the_model_device(tmp_path: Path):
    from cifar import train as c
    from common.data import TrainBatches
    from common.parallel import wrap_model
    from tests.test_cifar import SMALL, make_folders

    make_folders(tmp_path / "data")
    # No augmentation: a torch.Generator cannot live on the meta device (the program's
    # generator is on dist.device, as the data is).
    cfg = c.parse_args(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"),
                        "--device", "cpu", "--batch-size", "12", "--translate", "0", "--no-flip",
                        "--amp", "off", "--no-lookahead", *SMALL])
    data = c.build_data(cfg, META)
    model = wrap_model(c.build_model(cfg, data).to(memory_format=torch.channels_last), META)
    optimizer, scheduler = c.build_optimizer(cfg, model, len(data.train_labels) // 12)
    batches = TrainBatches([data.train_images, data.train_labels], 12, META, seed=0)
    with runs_on_meta(model):
        c.train_one_epoch(model, batches, optimizer, scheduler, cfg, EpochProgress(0), META, False, None)
    with runs_on_meta():
        c.evaluate(model, data, cfg, META, False, tta=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rng_state_is_this_ranks_gpu_only():
    from common.rng import capture_rng, restore_rng

    device = torch.device("cuda", torch.cuda.device_count() - 1)
    state = capture_rng(device)
    assert isinstance(state["cuda"], torch.Tensor)  # one generator, not one per visible GPU
    first = torch.rand(4, device=device)
    restore_rng(state, device)
    assert torch.equal(torch.rand(4, device=device), first)
    assert "cuda" not in capture_rng(torch.device("cpu"))  # a CPU run leaves CUDA alone
