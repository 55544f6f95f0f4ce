"""A training run's lifecycle in one object: its directory, resume, checkpoints, pre-emption, records.

A program builds its ``Training`` (model, optimizer, schedule, batches, loss), then hands it
to ``Run`` with whatever else must survive a restart (``keep``: objects with ``state_dict`` /
``load_state_dict``, such as early stopping or a weight average; ``constants``: plain values a
checkpoint carries for ``--eval-only``, such as a fitted preprocessor). Its loop then reads::

    run = Run(cfg, dist, meta, training, keep={...})
    for progress in run.epochs():
        train = train_one_epoch(..., progress, ..., stop=run.stop_requested)
        if train is None:
            run.leave(progress)          # pre-empted: checkpoint the step reached, exit 75
        ...
        run.log_epoch(row)
        run.save(progress.epoch)

and ``train_one_epoch`` keeps its running numbers in an ``EpochTally``. Programs never spell
checkpoint file names, epoch arithmetic or resume choices. The resume policy lives here too
(``agreed_checkpoint``, ``check_ranks_agree``), as does ``--eval-only`` (``run_eval_only``);
the checkpoint format is ``common/checkpoint.py``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import torch

from common.agree import all_gather_object, broadcast_object, stop_unless_all_ranks_agree, tensor_digest
from common.checkpoint import (
    CHECKPOINT,
    PREVIOUS,
    check_meta,
    load_training_state,
    read_checkpoint,
    require_keys,
    save_checkpoint,
    training_state,
)
from common.config import RunConfig, config_dict
from common.console import get_logger
from common.data import TrainBatches
from common.dist import DistInfo
from common.errors import UserError
from common.finite import FiniteLossWatch
from common.metrics import reduce_sums
from common.parallel import full_tensors, is_sharded, unwrap
from common.preempt import EpochProgress, Preemption
from common.records import RunRecorder, write_json_atomic
from common.rng import restore_rng
from common.rundir import claim_run_dir


class Stateful(Protocol):
    """What a checkpoint keeps besides the model and optimizer (torchtitan's ``Stateful``)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class Training:
    """What ``train_one_epoch`` steps: the (wrapped) model, its optimizer and per-step schedule,
    the training batches and the per-batch loss ``loss(model output, batch)``, the mean over
    this rank's share. A program adds what its step needs besides."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: TrainBatches
    loss: Callable[..., torch.Tensor]

    def step(self, loss: torch.Tensor, step_in_epoch: int) -> None:
        """One optimizer step on ``loss``, this rank's mean over its share of global batch
        ``step_in_epoch``: the gradient of the global batch's mean (``TrainBatches.global_mean``;
        DDP and FSDP average gradients across ranks in backward), then the optimizer and the
        per-step schedule."""
        self.optimizer.zero_grad(set_to_none=True)
        self.batches.global_mean(loss, step_in_epoch).backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()


class EpochTally:
    """One epoch's running training numbers on this rank: the loss summed over samples, the
    samples, and any counts a program adds (``add(loss, n, correct=...)``).

    They stay on the device (reading a loss every step would make the host wait for the GPU
    every step), every loss is checked finite there (``FiniteLossWatch``), and a pre-empted
    epoch's sums come back from its checkpoint (``progress.sums``), so ``totals()`` is exact
    over all ranks whether or not the epoch was interrupted.
    """

    def __init__(self, progress: EpochProgress, steps_per_epoch: int, dist: DistInfo) -> None:
        self.progress, self.dist = progress, dist
        self.first_step = progress.epoch * steps_per_epoch  # of the run: what a non-finite loss names
        self.finite = FiniteLossWatch(dist)
        self.sums: dict[str, Any] = {
            name: value.to(dist.device).clone() if isinstance(value, torch.Tensor) else value
            for name, value in progress.sums.items()
            if not name.startswith("_")  # a program's own saved state, not a sum
        }
        self.sums.setdefault("loss", torch.zeros((), dtype=torch.float64, device=dist.device))
        self.sums.setdefault("n", 0)

    def add(self, loss: torch.Tensor, n: int, **counts: torch.Tensor) -> None:
        """After each step: the batch's mean ``loss`` over this rank's ``n`` samples, and counts
        (device tensors) to add up."""
        self.finite.update(loss, self.first_step + self.progress.step)
        self.sums["loss"] += loss.detach().double() * n
        self.sums["n"] += n
        for name, count in counts.items():
            self.sums[name] = self.sums[name] + count if name in self.sums else count
        self.progress.step += 1

    def stopped(self, stop: Callable[[], bool] | None) -> bool:
        """True when ``stop()`` says so (pre-emption, the same answer on every rank after the same
        step); ``progress`` then holds the step reached and this rank's sums, for the checkpoint."""
        if stop is None or not stop():
            return False
        self.finite.check()
        self.progress.sums = dict(self.sums)
        return True

    def totals(self) -> dict[str, float]:
        """The epoch's sums over all ranks (exact); call on every rank at the epoch's end."""
        self.finite.check()
        return reduce_sums(self.sums, self.dist)


class Run:
    """One launch of a training run: it owns the run directory, resumes, checkpoints, leaves.

    Creating it (on every rank, a collective) claims ``cfg.out_dir`` for this launch
    (``common.rundir``), resumes from the checkpoint every rank agrees on when ``cfg.resume``
    asks (weights, optimizer, schedule, RNG and every ``keep`` object, loaded in place), checks
    that all ranks start from the same state, installs the pre-emption handlers and opens the
    metrics file. ``meta`` names the program and architecture, so a checkpoint of something
    else is refused.

    A finished run resumed (``start_epoch == cfg.epochs``) trains nothing: ``epochs()`` is empty
    and the program evaluates it again.
    """

    def __init__(
        self,
        cfg: RunConfig,
        dist: DistInfo,
        meta: dict[str, Any],
        training: Training,
        keep: dict[str, Stateful] | None = None,
        constants: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.dist, self.meta, self.training = cfg, dist, meta, training
        model, optimizer, scheduler = training.model, training.optimizer, training.scheduler
        self.keep, self.constants = keep or {}, constants or {}
        # The data is valid by now: this launch becomes the one writer of --out-dir, or stops.
        claim_run_dir(cfg.out_dir, cfg.PROGRAM, dist, cfg.resume is not None, cfg.overwrite)
        state = agreed_checkpoint(cfg.resume, cfg.out_dir, dist, meta, cfg)
        if state is not None:
            require_keys(state, ("model", "optimizer", "epoch", *self.keep), cfg.PROGRAM)
            load_training_state(state, model, optimizer, scheduler)
            for name, part in self.keep.items():
                part.load_state_dict(state[name])
            if state.get("world_size") == dist.world_size:  # else the per-rank streams cannot line up
                restore_rng(state["rng"][dist.rank], dist.device)
        check_ranks_agree(state, model, dist)
        self.loaded_from: str | None = state["loaded_from"] if state else None
        self.start_epoch = state["epoch"] + 1 if state else 0
        if self.start_epoch > cfg.epochs:
            raise UserError(
                f"--resume: the checkpoint finished epoch {self.start_epoch}, more than "
                f"--epochs {cfg.epochs}; pass --epochs {self.start_epoch} or more"
            )
        self._resumed = progress_from(state, dist)
        self.preemption = Preemption(dist)
        self.recorder = RunRecorder(cfg.out_dir, dist, self.start_epoch, tensorboard=cfg.tensorboard)
        self.plots_dir = self.recorder.plots_dir

    def epochs(self) -> Iterator[EpochProgress]:
        """Where each epoch left to train starts: step 0, or the step a pre-empted run reached.

        When the loop ends (or breaks), SIGTERM again stops the process at once: a signal
        during the final evaluation or the plots must not wait for a step that never comes.
        """
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                resumed, self._resumed = self._resumed, None
                yield resumed if resumed is not None and resumed.epoch == epoch else EpochProgress(epoch)
        finally:
            self.preemption.release()

    def stop_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM / SIGUSR1; call after every step."""
        return self.preemption.stop_requested()

    def save(self, epoch: int, progress: EpochProgress | None = None) -> None:
        """Checkpoint after ``epoch`` (the last completed one), or inside the epoch after it at
        ``progress``; call on every rank (a collective)."""
        state = training_state(
            self.training.model,
            self.training.optimizer,
            epoch,
            self.meta,
            self.training.scheduler,
            config=config_dict(self.cfg),
            **self.constants,
            **{name: part.state_dict() for name, part in self.keep.items()},
        )
        save_checkpoint(self.cfg.out_dir, state, self.dist, progress)

    def leave(self, progress: EpochProgress) -> NoReturn:
        """Pre-empted inside ``progress.epoch``: checkpoint the step reached and exit 75."""
        self.save(progress.epoch - 1, progress)
        log = get_logger(self.cfg.PROGRAM, self.dist)
        self.preemption.leave(Path(self.cfg.out_dir) / CHECKPOINT, progress, log.info)

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Append one epoch's row to metrics.jsonl (and TensorBoard)."""
        self.recorder.log_epoch(row)

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every epoch row of the run so far, the resumed launches' included."""
        return self.recorder.read_metrics()

    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json: the results and the run's config, versions and commit (rank 0)."""
        self.recorder.write_summary(summary, self.cfg)

    def write_text(self, name: str, text: str) -> None:
        """A text file in the run directory (rank 0, atomically)."""
        self.recorder.write_text(name, text)


def progress_from(state: dict[str, Any] | None, dist: DistInfo) -> EpochProgress | None:
    """The partial epoch a checkpoint records, with this rank's sums; None at an epoch boundary.

    At the world size that wrote it, each rank gets back its own sums (exact). At another world
    size the ranks' shares of each batch differ; rank 0 then takes every rank's sums added up
    (the epoch's numbers are then exact up to rounding) and the others start from zero. The
    model's trajectory is the same either way: the global batches do not depend on the world
    size (common.data.TrainBatches).
    """
    if not state or not state.get("step_in_epoch"):
        return None
    saved: list[dict[str, Any]] = state["epoch_sums"]
    if state.get("world_size") == dist.world_size:
        sums = saved[dist.rank]
    elif dist.is_main:
        sums = {k: sum(rank_sums[k] for rank_sums in saved) for k in saved[0] if not k.startswith("_")}
    else:
        sums = {}
    return EpochProgress(epoch=state["epoch"] + 1, step=state["step_in_epoch"], sums=sums)


def candidates(resume: str, out_dir: Path) -> list[Path]:
    """Where ``--resume`` looks on this rank, newest first: ``auto`` = this run's checkpoints."""
    if resume == "auto":
        return [Path(out_dir) / CHECKPOINT, Path(out_dir) / PREVIOUS]
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT
    return [path, path.with_name(PREVIOUS)] if path.name == CHECKPOINT else [path]


def newest_local(resume: str, out_dir: Path) -> tuple[dict[str, Any] | None, bytes | None, bool]:
    """This rank's newest checkpoint that loads: ``(report, file bytes, any candidate exists)``.

    The report (epoch, step, SHA-256 of the file, path) is what the ranks compare; the bytes
    are kept for sending to ranks that lack the file.
    """
    found = False
    for candidate in candidates(resume, out_dir):
        if not candidate.is_file():
            continue
        found = True
        try:
            blob = candidate.read_bytes()
        except OSError:
            continue
        try:
            state = read_checkpoint(io.BytesIO(blob), "cpu", candidate)
        except UserError as refused:  # a file that would run code: every rank must hear of it
            return {"refused": str(refused)}, None, found
        if state is None:
            continue
        report = {
            "epoch": state.get("epoch"),
            "step": state.get("step_in_epoch", 0),
            "path": str(candidate),
            "sha256": hashlib.sha256(blob).hexdigest(),
        }
        return report, blob, found
    return None, None, found


def agreed_checkpoint(
    resume: str | None, out_dir: Path, dist: DistInfo, expect_meta: dict[str, Any], config: RunConfig | None = None
) -> dict[str, Any] | None:
    """The one checkpoint every rank resumes from; call on every rank (it is a collective).

    Each rank looks where ``--resume`` says (``auto``: its own ``out_dir``, newest that loads:
    ``checkpoint.pt``, then ``checkpoint.prev.pt``). Rank 0's rule, applied identically on
    every rank from the gathered reports: the newest (highest epoch; ties to the lowest rank,
    so rank 0's own file when it has one). The file's bytes go from the rank that holds it to
    every rank whose copy is missing or differs (a broadcast; these checkpoints are at most tens
    of MB), so nodes without a shared filesystem resume from the same state. Every rank then
    loads the same bytes, so a checkpoint of another program fails the same way everywhere.

    Returns the loaded state (on the CPU; ``state["loaded_from"]`` names the chosen
    file, ``state["sent_by"]`` the rank it came from), or None when there is nothing to resume
    (``--resume`` absent, or ``auto`` and no rank has a checkpoint). Raises UserError on every
    rank when an explicit ``--resume PATH`` exists nowhere or does not load anywhere, and when
    the checkpoint is another program's, or (with ``config``) a run with other settings
    (``check_same_settings``), or another model (``expect_meta``).
    """
    if resume is None:
        return None
    report, blob, found = newest_local(resume, out_dir)
    reports = all_gather_object({"report": report, "found": found}, dist)
    refused = [r["report"]["refused"] for r in reports if r["report"] and "refused" in r["report"]]
    if refused:
        raise UserError(refused[0])  # on every rank: never resume past a doctored file
    held = [
        (r["report"]["epoch"] if r["report"]["epoch"] is not None else -1, r["report"]["step"] or 0, -rank, rank)
        for rank, r in enumerate(reports)
        if r["report"] is not None
    ]
    if not held:
        if resume == "auto":
            return None
        where = candidates(resume, out_dir)[0]
        if any(r["found"] for r in reports):
            raise UserError(f"--resume: no loadable checkpoint at {where} (corrupt or truncated)")
        raise UserError(
            f"--resume {resume}: no checkpoint found at {where}" + (" on any node" if dist.is_distributed else "")
        )
    source = max(held)[-1]
    chosen = reports[source]["report"]
    if any(r["report"] is None or r["report"]["sha256"] != chosen["sha256"] for r in reports):
        received = broadcast_object(blob if dist.rank == source else None, dist, src=source)
        if report is None or report["sha256"] != chosen["sha256"]:
            blob = received
    # On the CPU: the model and optimizer loaders copy what they own to their parameters'
    # device; RNG states, fitted transforms and step counters stay host objects.
    state = read_checkpoint(io.BytesIO(blob), "cpu")
    if state is None:  # it loaded on the source: only a transfer gone wrong ends here
        raise UserError(f"--resume: the checkpoint sent by rank {source} did not load on rank {dist.rank}")
    check_meta(state, {"program": expect_meta["program"]}, chosen["path"])
    if config is not None:
        check_same_settings(config, state, chosen["path"])
    check_meta(state, expect_meta, chosen["path"])
    state["loaded_from"], state["sent_by"] = chosen["path"], source
    return state


def check_same_settings(config: RunConfig, state: dict[str, Any], path: Path | str) -> None:
    """Refuse to continue a run with settings that change its data or optimisation (the seed,
    the split, the batch size, the epochs, the model): the same run is continued or none.

    The line names the first such setting, its value here and the value the run was started
    with; only the options in ``RUN_OPTIONS`` and the program's ``RESUME_OPTIONS`` may change.
    """
    if not isinstance(state.get("config"), dict):
        return  # a checkpoint that records no settings: its program's own checks apply
    changed = config.settings_changed_from(state["config"])
    if changed:
        name, value, saved = changed[0]
        more = f" (and {', '.join('--' + n.replace('_', '-') for n, _, _ in changed[1:])})" if changed[1:] else ""
        raise UserError(
            f"--resume {path}: --{name.replace('_', '-')} is {value!r} here but {saved!r} in the "
            f"run being resumed{more}; resume with the run's settings, or start a new run "
            "in another --out-dir"
        )


def weights_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of the whole model's weights and buffers, by name (gathered under FSDP).

    Call on every rank (a collective under FSDP). Equal on two ranks iff their replicas hold
    bit-identical tensors.
    """
    state = unwrap(model).state_dict()
    if is_sharded(model):
        state = full_tensors(state)
    return tensor_digest(state.items())


def check_ranks_agree(state: dict[str, Any] | None, model: torch.nn.Module, dist: DistInfo) -> None:
    """Stop every rank with one ``error:`` line unless all ranks start from the same state.

    Compares the epoch and step resumed from and a checksum of the model's weights as loaded;
    call on every rank after resuming (or starting fresh), before training or evaluating.
    """
    view = (
        f"epoch {state.get('epoch') if state else None}, "
        f"step {state.get('step_in_epoch', 0) if state else None}, "
        f"weights {weights_checksum(model)[:16]}"
    )
    stop_unless_all_ranks_agree(
        view, "the state training starts from (every rank must resume from the same checkpoint)", dist
    )


def load_for_evaluation(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], state: dict[str, Any], dist: DistInfo
) -> torch.nn.Module:
    """``model`` (unwrapped) on this rank's device holding ``weights`` from the checkpoint
    ``state``, checked to be the same on every rank: what ``evaluate_checkpoint`` evaluates."""
    model = model.to(dist.device)
    model.load_state_dict(weights)
    check_ranks_agree(state, model, dist)
    return model


EvaluateCheckpoint = Callable[[RunConfig, dict[str, Any], DistInfo], dict[str, Any]]


def run_eval_only(
    cfg: RunConfig, dist: DistInfo, evaluate_checkpoint: EvaluateCheckpoint, required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Evaluate the checkpoint ``cfg.resume`` names with ``evaluate_checkpoint(saved_cfg, state,
    dist)``; call on every rank. ``required``: the checkpoint keys it reads besides ``model``
    and ``config`` (a checkpoint without them is one clear error). Returns eval.json's content.
    """
    state = agreed_checkpoint(cfg.resume, cfg.out_dir, dist, {"program": cfg.PROGRAM})
    if state is None:  # --resume auto and no rank has a checkpoint in its --out-dir
        raise UserError(f"--eval-only --resume: no checkpoint in {cfg.out_dir} on any node")
    require_keys(state, ("model", "config", *required), cfg.PROGRAM)
    saved = cfg.for_evaluation(state["config"], state["loaded_from"])
    results = {
        **evaluate_checkpoint(saved, state, dist),
        "checkpoint": state["loaded_from"],
        "world_size": dist.world_size,
    }
    if dist.is_main:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg.out_dir / "eval.json", results)
    return results
