"""Checkpoints that survive crashes: atomic writes on rank 0, the last two kept, RNG per rank.

Layout in the run directory: ``checkpoint.pt`` (newest) and ``checkpoint.prev.pt`` (the one
before). A write goes to a temporary file first and is renamed into place, so a crash mid-write
never damages the newest good checkpoint; a file that fails to load (truncated, corrupt) is
skipped in favour of the previous one.

Loading never runs code from the file: every file the programs read with ``torch.load`` goes
through ``load_tensors_file`` (``weights_only=True``), so a checkpoint holds only tensors and
plain values - fitted scikit-learn transforms are stored through ``common.safe_state``, RNG
states as tensors and tuples, paths as strings. A file holding anything else (a pickled object,
as every checkpoint written before this format did) is refused with one ``error:`` line.

A write that fails (a full disk, a quota) leaves the previous checkpoints untouched and no
temporary file, and stops every rank with one line naming the file and the cause.

Which checkpoint a job resumes from, and checking that every rank holds it, is the resume
policy in ``common/run.py``.

``torch.distributed.checkpoint.state_dict`` is imported inside the functions that use it, for
the reason common/parallel.py gives.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from common.agree import stop_if_any_rank_failed
from common.dist import DistInfo
from common.errors import UserError
from common.files import write_atomic
from common.parallel import is_sharded, unwrap
from common.preempt import EpochProgress
from common.rng import capture_rng

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


def _gather_per_rank(dist: DistInfo, sums: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every rank's RNG state and running epoch sums, in rank order, for rank 0 to write."""
    local = {"rng": capture_rng(dist.device, plain=True), "sums": sums}
    if not dist.is_distributed:
        return [local]
    states: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(states, local)
    return states


class _RecordingWriter:
    """A file wrapper that keeps the OSError of a failed write.

    ``torch.save`` reports a failed write (ENOSPC) as "RuntimeError: unexpected pos", losing
    the cause; this keeps it for the error line.
    """

    def __init__(self, file) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def write_checkpoint(out_dir: Path, payload: dict[str, Any]) -> str | None:
    """Write ``payload`` as the newest checkpoint (rank 0); return None, or why the write failed.

    The newest becomes ``checkpoint.prev.pt`` only once the new file is complete
    (``common.files.write_atomic``), so a failed write leaves the checkpoints in place untouched.
    """
    out_dir = Path(out_dir)
    recorder: _RecordingWriter | None = None

    def write(tmp: Path) -> None:
        nonlocal recorder
        with open(tmp, "wb") as f:
            recorder = _RecordingWriter(f)
            torch.save(payload, recorder)

    try:
        write_atomic(out_dir / CHECKPOINT, write, previous=out_dir / PREVIOUS)
        return None
    except (OSError, RuntimeError) as err:
        cause = recorder.error if recorder is not None and recorder.error is not None else err
        if isinstance(cause, RuntimeError):
            raise  # not an I/O failure: a bug, with its traceback
        kept = "the previous checkpoint is kept" if (out_dir / CHECKPOINT).exists() else "no checkpoint was kept"
        return (
            f"{out_dir / CHECKPOINT}: cannot write the checkpoint ({cause.strerror or cause}); "
            f"{kept}; free space (or pick another --out-dir) and resume with --resume"
        )


def save_checkpoint(
    out_dir: Path, state: dict[str, Any], dist: DistInfo, progress: EpochProgress | None = None
) -> None:
    """Write ``state`` plus every rank's RNG state; call on all ranks (it is a collective).

    ``state`` should hold the unwrapped model's ``state_dict``, optimizer, scheduler, epoch,
    step and config, plus a ``meta`` dict naming the program and architecture so ``--resume``
    can refuse a checkpoint from something else. Only tensors and plain values: anything else
    would not load (see ``load_tensors_file``).

    ``progress`` (a pre-emption mid-epoch, see common/preempt.py) adds the steps done in the
    epoch after ``state["epoch"]`` and each rank's running sums for it; without it the
    checkpoint is at an epoch boundary (``step_in_epoch`` 0).

    If rank 0 cannot write the file (full disk, quota, permissions), every rank stops with one
    ``error:`` line naming the file and the cause (exit status 2); nothing half-written is left.
    """
    if progress is not None:
        # CPU copies: the sums travel to rank 0 by pickling, and a checkpoint is loaded anywhere.
        sums = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in progress.sums.items()}
    per_rank = _gather_per_rank(dist, sums if progress is not None else None)
    problem = None
    if dist.is_main:
        problem = write_checkpoint(
            out_dir,
            {
                **state,
                "rng": [r["rng"] for r in per_rank],
                "world_size": dist.world_size,
                "step_in_epoch": progress.step if progress is not None else 0,
                "epoch_sums": [r["sums"] for r in per_rank] if progress is not None else None,
            },
        )
    # Rank 0's verdict reaches every rank, and nobody moves on (or exits) until the file is in
    # place or all know it is not.
    stop_if_any_rank_failed(problem, dist)


def load_tensors_file(
    path: Path | io.BytesIO, map_location: torch.device | str = "cpu", name: str | Path | None = None
) -> Any:
    """``torch.load`` that never runs code from the file (``weights_only=True``).

    Raises UserError naming ``path`` when the file holds a pickled object (refused: unpickling
    it could run anything); other failures (missing, truncated, not a torch file) propagate as
    they are, for the caller to judge.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # A refused class or function is what a doctored or old-format file holds; any other
        # unpickling failure (an unknown opcode in a damaged file) is damage, not danger.
        if "global" not in str(err).lower():
            raise
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        raise UserError(
            f"{name or path}: refused to load: it holds {what}, and unpickling could run code; "
            "this project's files hold only tensors and plain values (files written "
            "before that format are refused too: train again to write a new one)"
        ) from None


def read_checkpoint(
    path: Path | io.BytesIO, map_location: torch.device | str, name: str | Path | None = None
) -> dict[str, Any] | None:
    """The checkpoint in ``path``, or None when it does not load (missing, truncated, not one).

    A file refused as unsafe raises UserError (``load_tensors_file``): never skipped silently.
    """
    try:
        state = load_tensors_file(path, map_location, name)
    except UserError:
        raise  # refused as unsafe: never fall back silently past a doctored file
    except Exception:  # noqa: BLE001 - any failure to read means "not a good checkpoint"
        return None
    return state if isinstance(state, dict) and "model" in state else None


def require_keys(state: dict[str, Any], keys: tuple[str, ...], program: str) -> None:
    """UserError naming the checkpoint when it lacks any of ``keys`` (written by something else)."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise UserError(
            f"{state.get('loaded_from', 'checkpoint')}: lacks {', '.join(map(repr, missing))}, "
            f"so it was not written by this version of {program}/train.py; pass a "
            f"{program} run directory or checkpoint.pt, or train again"
        )


def check_meta(state: dict[str, Any], expect_meta: dict[str, Any], path: Path | str) -> None:
    """Refuse a checkpoint of another program or architecture with one clear line."""
    meta = state.get("meta", {})
    mismatched = {k: (meta.get(k), v) for k, v in expect_meta.items() if meta.get(k) != v}
    if mismatched:
        what = ", ".join(f"{k} is {got!r}, expected {want!r}" for k, (got, want) in mismatched.items())
        raise UserError(f"--resume {path}: checkpoint does not match this run ({what})")


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights by parameter name, on CPU for a sharded model.

    Call on every rank. Under FSDP the tensors are gathered to rank 0 and the other ranks get
    an empty dict (``common.parallel.local_copy`` gives every rank the whole model); otherwise
    every rank gets the full dict.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    inner = unwrap(model)
    return get_model_state_dict(inner, options=full_state_options(inner, gather_to_rank0=True))


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict (``full_model_state``'s) into a plain, DDP or FSDP model.

    Under FSDP each rank keeps its shard of ``state``; call on every rank with the whole dict.
    """
    if not is_sharded(model):  # each tensor is copied into the parameter, on its device
        unwrap(model).load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    # set_model_state_dict distributes the full tensors in place (FSDP), so hand it copies.
    set_model_state_dict(unwrap(model), dict(state), options=full_state_options(model))


def load_training_state(
    state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None
) -> None:
    """Load a checkpoint's weights, optimizer and schedule in place (``training_state``'s
    inverse); call on every rank. Under FSDP each rank keeps its shards.

    Raises UserError naming the file when the checkpoint does not fit this model, or when its
    schedule has another length (a OneCycleLR cannot continue at another length).
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    path = state.get("loaded_from", "checkpoint")
    inner = unwrap(model)
    try:
        load_model_state(inner, state["model"])
        # Like the weights, the optimizer state is distributed in place: hand it a copy.
        set_optimizer_state_dict(inner, optimizer, _copy_nested(state["optimizer"]), options=full_state_options(inner))
    except (RuntimeError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise UserError(f"--resume {path}: checkpoint does not fit this model ({first_line})") from None
    if scheduler is not None and state.get("scheduler") is not None:
        saved_steps = state["scheduler"].get("total_steps")
        steps = getattr(scheduler, "total_steps", None)
        if saved_steps is not None and steps is not None and saved_steps != steps:
            raise UserError(
                f"--resume {path}: its learning-rate schedule spans {saved_steps} steps, this "
                f"run's {steps}; resume with the --epochs and --batch-size it was started with"
            )
        scheduler.load_state_dict(state["scheduler"])


def _copy_nested(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_nested(v) for v in value]
    return value


def training_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    meta: dict[str, Any],
    scheduler: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """The dict ``save_checkpoint`` expects: full weights, optimizer, scheduler, epoch.

    Call on every rank (with FSDP, gathering the full state is a collective). Weights and
    optimizer state are *full* state dicts keyed by parameter name, without DDP's ``module.``
    prefix, so a checkpoint written under DDP or FSDP at any world size resumes under either at
    any other. ``epoch`` is the last *completed* epoch; ``extra`` carries program state such as
    the best-so-far weights for early stopping.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    inner = unwrap(model)
    options = full_state_options(inner, gather_to_rank0=True)
    return {
        "model": full_model_state(inner),
        "optimizer": get_optimizer_state_dict(inner, optimizer, options=options),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "meta": meta,
        **extra,
    }


def full_state_options(model: torch.nn.Module, gather_to_rank0: bool = False):
    """Whole tensors keyed by parameter name; with ``gather_to_rank0``, gathered to rank 0 only.

    Rank 0 is the rank that writes. cpu_offload is what gathers there, and it needs a process
    group, so it is only asked for when the model is sharded.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    offload = gather_to_rank0 and tdist.is_initialized() and is_sharded(model)
    return StateDictOptions(full_state_dict=True, cpu_offload=offload)
