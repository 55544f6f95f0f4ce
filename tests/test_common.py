"""In-process unit tests of common/ (no process group needed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from common.checkpoint import CHECKPOINT, PREVIOUS, load_training_state, save_checkpoint, training_state
from common.config import RunConfig, make_parser
from common.data import TrainBatches, eval_shard, fixed_chunks
from common.dist import DistInfo
from common.errors import NonFiniteLossError, UserError
from common.finite import FiniteLossWatch
from common.metrics import confusion_matrix, reduce_sums
from common.records import RunRecorder
from common.run import agreed_checkpoint
from tests import dist_workers
from tests.launch import event_scalars, run_program

CPU = torch.device("cpu")


def rank_info(rank: int, world_size: int) -> DistInfo:
    return DistInfo(rank, rank, world_size, world_size, CPU)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_global_batches_do_not_depend_on_world_size(world_size):
    n, batch = 50, 12
    data = torch.arange(n)
    single = [b[0] for b in TrainBatches([data], batch, rank_info(0, 1), seed=1).epoch(2)]
    per_rank = [
        [b[0] for b in TrainBatches([data], batch, rank_info(r, world_size), seed=1).epoch(2)]
        for r in range(world_size)
    ]
    assert len(single) == n // batch  # the remainder joins the last batch
    for step, expected in enumerate(single):
        combined = torch.cat([per_rank[r][step] for r in range(world_size)])
        assert sorted(combined.tolist()) == sorted(expected.tolist())
    assert len(single[-1]) == batch + n % batch


def test_start_step_skips_trained_batches():
    batches = TrainBatches([torch.arange(40)], 8, rank_info(0, 1), seed=0)
    full = [b[0] for b in batches.epoch(1)]
    resumed = [b[0] for b in batches.epoch(1, start_step=3)]
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed)) and len(resumed) == 2


@pytest.mark.parametrize(
    "batch,world,message",
    [(1, 2, "smaller than the world size"), (9, 2, "does not divide"), (64, 1, "larger than the training set")],
)
def test_bad_batch_sizes_are_user_errors(batch, world, message):
    with pytest.raises(UserError, match=message):
        TrainBatches([torch.arange(40)], batch, rank_info(0, world), seed=0)


@pytest.mark.parametrize("n", [0, 1, 5, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_eval_shards_cover_every_sample_once(n, world_size):
    covered = [i for r in range(world_size) for i in range(n)[eval_shard(n, rank_info(r, world_size))]]
    assert covered == list(range(n))


@pytest.mark.parametrize("n", [0, 1, 5, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_fixed_chunks_are_the_same_chunks_at_any_world_size(n, world_size):
    """Every sample once, in order over the ranks, and cut at the same places (multiples of the
    chunk) whatever the world size: what makes chunked float64 scores world-size invariant."""
    slices = [s for r in range(world_size) for s in fixed_chunks(n, 4, rank_info(r, world_size))]
    assert [i for s in slices for i in range(n)[s]] == list(range(n))
    assert [(s.start, s.stop) for s in slices] == [(k, min(n, k + 4)) for k in range(0, n, 4)]


def test_confusion_matrix_and_single_process_reduction():
    preds, targets = torch.tensor([0, 1, 1, 2, 2, 2]), torch.tensor([0, 1, 2, 2, 2, 0])
    expected = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 1, 2]])
    assert torch.equal(confusion_matrix(preds, targets, 3), expected)
    assert reduce_sums({"a": torch.tensor([1.5, 2.5]), "n": 3}, rank_info(0, 1)) == {"a": 4.0, "n": 3.0}


def _save(out_dir: Path, epoch: int, program: str = "toy") -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(out_dir, training_state(model, optimizer, epoch, {"program": program}), rank_info(0, 1))


def test_checkpoints_keep_two_and_fall_back_when_newest_is_truncated(tmp_path):
    for epoch in range(3):
        _save(tmp_path, epoch)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, PREVIOUS])  # no temp files
    single = rank_info(0, 1)
    assert agreed_checkpoint("auto", tmp_path, single, {"program": "toy"})["epoch"] == 2
    newest = tmp_path / CHECKPOINT
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    state = agreed_checkpoint(str(newest), tmp_path / "elsewhere", single, {"program": "toy"})
    assert state["epoch"] == 1 and state["loaded_from"].endswith(PREVIOUS)
    (tmp_path / PREVIOUS).write_bytes(b"garbage")
    with pytest.raises(UserError, match="no loadable checkpoint"):
        agreed_checkpoint(str(newest), tmp_path / "elsewhere", single, {"program": "toy"})


def test_checkpoint_of_another_program_is_refused(tmp_path):
    _save(tmp_path, 0, program="cifar")
    with pytest.raises(UserError, match="program is 'cifar', expected 'housing'"):
        agreed_checkpoint(str(tmp_path / CHECKPOINT), tmp_path, rank_info(0, 1), {"program": "housing"})


def _one_cycle(total_steps: int):
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    return model, optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.01, total_steps=total_steps)


def test_resume_with_another_schedule_length_is_one_clear_error(tmp_path):
    model, optimizer, scheduler = _one_cycle(20)
    save_checkpoint(tmp_path, training_state(model, optimizer, 0, {"program": "toy"}, scheduler), rank_info(0, 1))
    state = agreed_checkpoint("auto", tmp_path, rank_info(0, 1), {"program": "toy"})
    load_training_state(state, *_one_cycle(20))
    assert state["epoch"] == 0
    with pytest.raises(UserError, match="schedule spans 20 steps, this run's 30; resume with the --epochs"):
        load_training_state(state, *_one_cycle(30))


def _args(*argv: str) -> argparse.Namespace:
    return make_parser("t", {"epochs": 1, "batch_size": 8, "lr": 0.1, "data_dir": "d", "out_dir": "o"}).parse_args(
        list(argv)
    )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--epochs", "0"], "--epochs must be a positive"),
        (["--batch-size", "-4"], "--batch-size must be a positive"),
        (["--lr", "0"], "--lr must be positive"),
    ],
)
def test_shared_argument_validation(argv, message, tmp_path):
    with pytest.raises(UserError, match=message):
        RunConfig.from_args(_args(*argv, "--out-dir", str(tmp_path)))


def test_out_dir_below_a_file_is_not_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not writable"):
        RunConfig.from_args(_args("--out-dir", str(tmp_path / "file" / "run")))


def test_finite_loss_watch_names_the_first_bad_step():
    """Nothing is read per step (no host sync on a GPU): the check at the epoch's end names the
    first non-finite step, not the epoch or the last step."""
    watch = FiniteLossWatch(rank_info(0, 1))
    watch.update(torch.tensor(0.5), 10)
    watch.check()
    watch.update(torch.tensor(float("nan")), 11)
    watch.update(torch.tensor(float("inf")), 12)
    watch.update(torch.tensor(0.25), 13)
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 11; check the training data"):
        watch.check()


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    """Rank 1's batch gives a NaN loss at step 5: both ranks raise the same error, naming the
    step and the rank (before, rank 1 stopped alone and rank 0 died in its next collective)."""
    messages = dist_workers.spawn(dist_workers.nan_loss_on_rank_1, 2, tmp_path)
    assert messages[0] == messages[1]
    assert "loss became nan at step 5 on rank 1 only" in messages[0]


def test_recorder_drops_epochs_after_the_resumed_checkpoint(tmp_path):
    recorder = RunRecorder(tmp_path, rank_info(0, 1))
    for epoch in range(4):
        recorder.log_epoch({"epoch": epoch})
    resumed = RunRecorder(tmp_path, rank_info(0, 1), start_epoch=2)
    assert [row["epoch"] for row in resumed.read_metrics()] == [0, 1]
    resumed.write_summary({"ok": True}, argparse.Namespace(x=1))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["config"] == {"x": 1} and "torch_version" in summary


def test_recorder_tensorboard_scalars_rank_0_only_and_resumed(tmp_path):
    pytest.importorskip("tensorboard")
    for rank in (1, 0):  # rank 1 of 2 writes nothing at all
        recorder = RunRecorder(tmp_path / f"rank{rank}", rank_info(rank, 2), tensorboard=True)
        for epoch in range(3):
            recorder.log_epoch(
                {
                    "epoch": epoch,
                    "train_loss": 1.0 / (epoch + 1),
                    "lr": 0.1 * epoch,
                    "val": {"rmse": 10.0 + epoch},
                    "note": "text",
                    "flag": True,
                }
            )
        recorder.close()
    assert not (tmp_path / "rank1").exists()
    expected = {
        "train_loss": [(0, 1.0), (1, 0.5), (2, 1 / 3)],
        "lr": [(0, 0.0), (1, 0.1), (2, 0.2)],
        "val/rmse": [(0, 10.0), (1, 11.0), (2, 12.0)],
    }
    got = event_scalars(tmp_path / "rank0" / "tensorboard")
    assert got.keys() == expected.keys()
    for tag, points in expected.items():
        assert [step for step, _ in got[tag]] == [step for step, _ in points]
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6)
    # Resumed from epoch 1: the old epoch-1 and epoch-2 points are hidden, the new ones shown.
    resumed = RunRecorder(tmp_path / "rank0", rank_info(0, 1), start_epoch=1, tensorboard=True)
    resumed.log_epoch({"epoch": 1, "train_loss": 7.0})
    resumed.close()
    assert event_scalars(tmp_path / "rank0" / "tensorboard")["train_loss"] == [(0, 1.0), (1, 7.0)]


def test_tensorboard_flag_without_the_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("common.config.tensorboard_available", lambda: False)
    RunConfig.from_args(_args("--out-dir", str(tmp_path)))  # not asked for: fine
    with pytest.raises(UserError, match="--tensorboard needs the tensorboard package: pip install"):
        RunConfig.from_args(_args("--tensorboard", "--out-dir", str(tmp_path)))


def test_bad_argument_exits_with_one_line(tmp_path):
    result = run_program("tests/toy_train.py", ["--out-dir", str(tmp_path), "--batch-size", "0"])
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --batch-size must be a positive integer, got 0"


@pytest.mark.parametrize("n,batch", [(101, 11), (101, 8), (7, 2), (2, 4)])
def test_every_rank_gets_the_same_number_of_eval_batches(n, batch):
    from common.data import eval_batches

    data = torch.arange(n)
    per_rank = [[b[0] for b in eval_batches([data], batch, rank_info(r, 3))] for r in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1  # FSDP needs equal forward counts
    assert all(len(b) <= batch for batches in per_rank for b in batches)
    assert torch.cat([b for batches in per_rank for b in batches]).tolist() == list(range(n))


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path):
    from common.files import write_atomic, write_text_atomic

    target = write_text_atomic(tmp_path / "table.md", "old\n")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(target, half_then_fail)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["table.md"]
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_save_figure_writes_the_file_and_closes_the_figure(tmp_path):
    from common.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "line.png")
    assert (tmp_path / "line.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.number not in plt.get_fignums()
    assert [p.name for p in tmp_path.iterdir()] == ["line.png"]


def test_eval_only_config_comes_from_the_checkpoint_but_run_options_from_the_command_line(tmp_path):
    """RunConfig.for_evaluation (--eval-only): the saved run's fields, this launch's run options
    and EVAL_OPTIONS; a saved config this version cannot take is one clear error."""
    import dataclasses

    from common.config import RunConfig

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(RunConfig):
        PROGRAM = "toy"
        EVAL_OPTIONS = ("threshold",)
        width: int
        threshold: float = 0.5

        def check(self) -> None:
            if self.width < 1:
                raise UserError(f"--width must be >= 1, got {self.width}")

    saved = {
        "data_dir": "old",
        "out_dir": "old",
        "epochs": 7,
        "batch_size": 32,
        "lr": 0.1,
        "seed": 3,
        "resume": None,
        "device": "cuda",
        "strategy": "fsdp",
        "dist_timeout": 9.0,
        "tensorboard": False,
        "eval_only": False,
        "width": 16,
        "threshold": 0.5,
    }
    now = Config(
        data_dir=tmp_path,
        out_dir=tmp_path / "e",
        epochs=1,
        batch_size=8,
        lr=0.2,
        width=4,
        threshold=0.9,
        device="cpu",
        resume="run",
        eval_only=True,
    )
    cfg = now.for_evaluation(saved, "run/checkpoint.pt")
    assert (cfg.width, cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed) == (16, 7, 32, 0.1, 3)  # the run's
    assert (cfg.data_dir, cfg.out_dir, cfg.device, cfg.strategy, cfg.resume) == (
        tmp_path,
        tmp_path / "e",
        "cpu",
        "ddp",
        "run",
    )  # this launch's
    assert cfg.threshold == 0.9 and cfg.eval_only
    with pytest.raises(UserError, match=r"run/checkpoint.pt: its config does not fit this version of toy/train.py"):
        now.for_evaluation({**saved, "depth": 2}, "run/checkpoint.pt")
    with pytest.raises(UserError, match="--width must be >= 1, got 0"):  # the program's check runs too
        now.for_evaluation({**saved, "width": 0}, "run/checkpoint.pt")


def test_device_clock_adds_up_only_the_timed_sections():
    import time as clock

    from common.timing import DeviceClock

    timer = DeviceClock(torch.device("cpu"), seconds=1.0)  # a resumed run's earlier time
    with timer.timed():
        clock.sleep(0.05)
    clock.sleep(1.0)  # not timed
    with timer.timed():
        clock.sleep(0.1)
    assert 0.1 <= timer.last_section < 1.0
    assert 1.15 <= timer.seconds < 2.15  # the untimed second is not in it


def test_run_dir_on_a_filesystem_without_locks_still_runs(tmp_path, capsys, monkeypatch):
    """Some network mounts refuse flock: the run goes on unlocked, with a warning, and a folder
    holding a run is still refused without --resume."""
    import errno

    from common import rundir

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    rundir.claim_run_dir(tmp_path / "run", "housing", rank_info(0, 1), resume=False, overwrite=False)
    assert "cannot be locked (No locks available)" in capsys.readouterr().err
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a run"):
        rundir.claim_run_dir(tmp_path / "held", "housing", rank_info(0, 1), resume=False, overwrite=False)
