"""Every path of every program works with its model and data off the host (no GPU needed).

The programs run on the stand-in device of tests/standin.py: tensors that live off the host,
as they do on a GPU (so ``.numpy()``, a CPU generator's ``set_state`` and an op with a CPU
tensor refuse them), with real values, so a whole program runs to its end. Each program is
trained, pre-empted mid-epoch and resumed on 2 processes, resumed at another world size,
re-evaluated with ``--eval-only`` on 3, and must end exactly where the same run on the CPU ends.
The sync tests count what a training step asks of the host.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.dist import DistInfo
from common.preempt import EpochProgress
from tests.launch import SAME_WEIGHTS, assert_same_weights, checkpoint_weights, resume_copy, run_program
from tests.standin import DEVICE, standin_device

ON_STANDIN = "tests/on_standin.py"
STANDIN = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=DEVICE)


def test_standin_refuses_what_a_gpu_refuses_and_counts_host_syncs():
    with standin_device() as device:
        x = torch.arange(4.0, device=DEVICE)
        assert x.device == DEVICE and x.sum().device == DEVICE
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(4)
        assert (x + torch.tensor(1.0)).device == DEVICE  # a 0-dim CPU tensor may join, as on a GPU
        generator = torch.Generator()
        with pytest.raises(TypeError, match="ByteTensor"):
            generator.set_state(generator.get_state().to(DEVICE))
        before = len(device.syncs)
        assert float(x.sum()) == 6.0 and x.tolist() == [0.0, 1.0, 2.0, 3.0]
        assert torch.equal(x.cpu(), torch.arange(4.0))
        torch.tensor([1.0], device=DEVICE)
        torch.zeros(3, device=DEVICE)  # made on the device: no copy
        assert [kind for kind, _ in device.syncs[before:]] == ["item", "to_host", "to_host", "to_device"]


# ---------------------------------------------------------------- whole programs, every path


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _launch(script_args: list[str], nproc: int, standin: bool = True, **env: str):
    script, args = (ON_STANDIN, script_args) if standin else (script_args[0], script_args[1:])
    result = run_program(script, args, nproc=nproc, timeout=120, env=env)
    return result


def _check_every_path(
    program: str, args: list[str], tmp_path: Path, sigterm_at_step: int, metric, same_at_other_size=lambda name: True
) -> dict[str, Path]:
    """Train on 2 processes on the stand-in, pre-empted at a step of the second epoch, then
    ``--resume``: the same end as the CPU run. Then resume at world size 1 from the last epoch
    boundary (the weights named ``same_at_other_size`` end as on 2 processes) and
    ``--eval-only`` on 3 processes. ``metric(run_dir)`` reads the figures compared. Returns the
    run directories."""
    runs = {name: tmp_path / name for name in ("cpu", "device", "other_size", "eval")}
    cpu = _launch([program, *args, "--out-dir", str(runs["cpu"])], 2, standin=False)
    assert cpu.returncode == 0, cpu.stderr[-3000:]

    stopped = _launch(
        [program, *args, "--out-dir", str(runs["device"])], 2, STANDIN_SIGTERM_AT_STEP=str(sigterm_at_step)
    )
    assert "pre-empted by SIGTERM" in stopped.stdout, stopped.stderr[-3000:]
    saved = torch.load(runs["device"] / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert saved["step_in_epoch"] > 0
    resumed = _launch([program, *args, "--out-dir", str(runs["device"]), "--resume"], 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metric(runs["device"]) == metric(runs["cpu"])
    assert_same_weights(runs["device"], runs["cpu"])

    resume_copy(runs["cpu"], runs["other_size"])
    other = _launch([program, *args, "--out-dir", str(runs["other_size"]), "--resume"], 1)
    assert other.returncode == 0, other.stderr[-3000:]
    got, want = checkpoint_weights(runs["other_size"]), checkpoint_weights(runs["cpu"])
    for name in filter(same_at_other_size, want):
        torch.testing.assert_close(got[name], want[name], **SAME_WEIGHTS)

    evaluated = _launch(
        [
            program,
            "--eval-only",
            "--resume",
            str(runs["device"]),
            "--data-dir",
            args[args.index("--data-dir") + 1],
            "--out-dir",
            str(runs["eval"]),
        ],
        3,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((runs["eval"] / "eval.json").read_text())["world_size"] == 3
    return runs


def test_housing_every_path_on_the_device(tmp_path):
    from tests.small_data import HOUSING_SMALL, write_housing

    write_housing(tmp_path)
    args = ["--data-dir", str(tmp_path), *HOUSING_SMALL]  # 3 epochs of 5 steps
    runs = _check_every_path("housing/train.py", args, tmp_path, 7, lambda run: _summary(run)["test"])
    evaluated = json.loads((runs["eval"] / "eval.json").read_text())
    assert evaluated["test"]["rmse"] == pytest.approx(_summary(runs["cpu"])["test"]["rmse"], rel=1e-12)


def test_anomaly_every_path_and_predict_on_the_device(tmp_path):
    from anomaly.data import TRAIN_FILE
    from anomaly.synthetic import make_partition, write_partition
    from tests.small_data import ANOMALY_SMALL

    write_partition(make_partition(1200, seed=3), tmp_path / TRAIN_FILE)
    args = ["--data-dir", str(tmp_path), *ANOMALY_SMALL, "--detector", "hybrid"]  # 3 epochs of 14 steps
    # At another world size only the autoencoder trains the same: the classifier's dropout
    # masks are drawn per rank (anomaly/README.md).
    runs = _check_every_path(
        "anomaly/train.py",
        args,
        tmp_path,
        20,
        lambda run: {k: _summary(run)[k] for k in ("test", "thresholds", "per_attack_cat")},
        same_at_other_size=lambda name: not name.startswith("classifier."),
    )
    evaluated = json.loads((runs["eval"] / "eval.json").read_text())
    assert evaluated["test"] == _summary(runs["cpu"])["test"]

    scored = {}
    for standin in (True, False):
        out = tmp_path / f"scored-{standin}.csv"
        result = _launch(
            [
                "anomaly/predict.py",
                str(tmp_path / TRAIN_FILE),
                "--detector",
                str(runs["device"] / "detector.pt"),
                "--out",
                str(out),
            ],
            1,
            standin=standin,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        scored[standin] = out.read_text()
    assert scored[True] == scored[False]


def test_cifar_every_path_on_the_device(tmp_path):
    from tests.small_data import CIFAR_SMALL, make_folders

    make_folders(tmp_path / "data")
    # bf16 autocast has no stand-in (torch has none for its device type); translate and flip
    # draw from the augmentation generator, whose state the mid-epoch checkpoint saves.
    args = [
        "--data-dir",
        str(tmp_path / "data"),
        "--batch-size",
        "6",
        "--epochs",
        "3",
        "--amp",
        "off",
        "--translate",
        "2",
        "--cutout",
        "4",
        *CIFAR_SMALL,
    ]  # 3 epochs of 6 steps
    # At another world size BatchNorm normalises over another share of each batch, so the
    # weights differ (cifar/README.md); that resume must still run on the device.
    runs = _check_every_path(
        "cifar/train.py",
        args,
        tmp_path,
        8,
        lambda run: {k: _summary(run)[k] for k in ("test_accuracy", "test_loss", "confusion_matrix")},
        same_at_other_size=lambda name: False,
    )
    evaluated = json.loads((runs["eval"] / "eval.json").read_text())
    assert evaluated["test_accuracy"] == _summary(runs["cpu"])["test_accuracy"]


# ---------------------------------------------------------------- no host sync per step


def _assert_syncs_do_not_grow(prepare_epoch, batch_sizes: tuple[int, int]) -> None:
    """``prepare_epoch(batch_size)`` builds a training run on the stand-in and returns its
    steps per epoch and a function that trains one epoch; the host syncs counted while it
    trains must not depend on how many steps the epoch takes."""
    steps, syncs = [], []
    with standin_device() as device:
        prepare_epoch(batch_sizes[0])[1]()  # first uses fill lazy caches once: not per step
        for batch_size in batch_sizes:
            n, train_epoch = prepare_epoch(batch_size)
            before = len(device.syncs)
            train_epoch()
            steps.append(n)
            syncs.append(device.syncs[before:])
    assert steps[1] >= 2 * steps[0], steps
    assert len(syncs[0]) == len(syncs[1]), (
        f"host syncs per epoch grow with its steps ({steps}): {[len(s) for s in syncs]}: {syncs}"
    )


def test_housing_training_step_does_not_wait_for_the_device(tmp_path):
    from housing import train as h
    from tests.small_data import HOUSING_SMALL, write_housing

    write_housing(tmp_path)

    def prepare_epoch(batch_size: int):
        cfg = h.parse_args(["--data-dir", str(tmp_path), *HOUSING_SMALL, "--batch-size", str(batch_size)])
        data = h.build_data(cfg, STANDIN)
        training = h.build_training(cfg, data, STANDIN)
        assert next(training.model.parameters()).device == DEVICE
        return len(training.batches), lambda: h.train_one_epoch(cfg, training, EpochProgress(0), STANDIN)

    _assert_syncs_do_not_grow(prepare_epoch, (96, 32))


def test_anomaly_training_step_does_not_wait_for_the_device(tmp_path):
    from anomaly import train as a
    from anomaly.data import TRAIN_FILE
    from anomaly.synthetic import make_partition, write_partition
    from tests.small_data import ANOMALY_SMALL

    write_partition(make_partition(600, seed=1), tmp_path / TRAIN_FILE)

    def prepare_epoch(batch_size: int):
        cfg = a.parse_args(
            ["--data-dir", str(tmp_path), *ANOMALY_SMALL, "--detector", "hybrid", "--batch-size", str(batch_size)]
        )
        training = a.build_training(cfg, a.build_data(cfg, STANDIN), STANDIN)
        return len(training.batches), lambda: a.train_one_epoch(cfg, training, EpochProgress(0), STANDIN)

    _assert_syncs_do_not_grow(prepare_epoch, (96, 32))


def test_cifar_training_step_does_not_wait_for_the_device(tmp_path):
    from cifar import train as c
    from common.parallel import wrap_model
    from tests.small_data import CIFAR_SMALL, make_folders

    make_folders(tmp_path / "data")  # 36 training images

    def prepare_epoch(batch_size: int):
        cfg = c.parse_args(
            [
                "--data-dir",
                str(tmp_path / "data"),
                "--batch-size",
                str(batch_size),
                "--epochs",
                "1",
                "--amp",
                "off",
                "--cutout",
                "4",
                "--lookahead",
                *CIFAR_SMALL,
            ]
        )
        training = c.build_training(cfg, c.build_data(cfg, STANDIN), STANDIN)
        assert training.lookahead is not None and not training.bf16
        return len(training.batches), lambda: c.train_one_epoch(cfg, training, EpochProgress(0), STANDIN)

    _assert_syncs_do_not_grow(prepare_epoch, (12, 4))

    def prepare_evaluation(eval_batch_size: int):  # the final flip-TTA evaluation is timed too
        cfg = c.parse_args(
            [
                "--data-dir",
                str(tmp_path / "data"),
                "--eval-batch-size",
                str(eval_batch_size),
                "--amp",
                "off",
                "--widths",
                "8",
                "16",
                "16",
                "--no-download",
            ]
        )
        data = c.build_data(cfg, STANDIN)
        model = wrap_model(c.build_model(cfg, data), STANDIN)
        return -(-len(data.test_labels) // eval_batch_size), lambda: c.evaluate(cfg, model, data, STANDIN, final=True)

    _assert_syncs_do_not_grow(prepare_evaluation, (8, 4))


def test_resumed_optimizer_state_is_where_its_parameters_are(tmp_path):
    """After --resume (here at another world size than the checkpoint's), AdamW's moments are
    on the device and its step counters on the host, as a fresh AdamW keeps them: a counter
    on the device would make every step wait for it."""
    from common.checkpoint import load_training_state
    from common.run import agreed_checkpoint
    from housing import train as h
    from tests.small_data import HOUSING_SMALL, write_housing

    write_housing(tmp_path)
    trained, run = tmp_path / "trained", tmp_path / "run"
    result = run_program(
        "housing/train.py",
        ["--data-dir", str(tmp_path), "--out-dir", str(trained), *HOUSING_SMALL],
        nproc=2,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    resume_copy(trained, run)  # epochs left to train
    cfg = h.parse_args(["--data-dir", str(tmp_path), "--out-dir", str(run), *HOUSING_SMALL, "--resume"])
    with standin_device() as device:
        data = h.build_data(cfg, STANDIN)
        syncs = []
        for resume in (False, True):
            training = h.build_training(cfg, data, STANDIN)
            if resume:
                meta = {"program": "housing", "arch": cfg.arch, "features": list(cfg.features)}
                state = agreed_checkpoint(cfg.resume, cfg.out_dir, STANDIN, meta, cfg)
                load_training_state(state, training.model, training.optimizer, training.scheduler)
                assert state["world_size"] == 2
                for moments in training.optimizer.state.values():
                    assert moments["step"].device.type == "cpu"
                    assert moments["exp_avg"].device == moments["exp_avg_sq"].device == DEVICE
            before = len(device.syncs)
            h.train_one_epoch(cfg, training, EpochProgress(1), STANDIN)
            syncs.append(device.syncs[before:])
    assert len(syncs[1]) == len(syncs[0]), f"a resumed epoch syncs more than a fresh one: {syncs}"


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
