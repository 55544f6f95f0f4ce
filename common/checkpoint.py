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

Resuming is one decision per job, not one per rank (``agreed_checkpoint``): every rank reports
the newest checkpoint that loads where *it* looks (its own ``--out-dir``: on a cluster without
a shared filesystem each node has its own), rank 0's choice (the newest, ties to the lowest
rank) is applied everywhere, and the file's bytes are broadcast from the rank that holds it to
ranks whose copy differs or is missing. ``check_ranks_agree`` then compares epoch, step and a
checksum of the weights on every rank before training starts: a disagreement is one ``error:``
line on every rank, never two replicas silently training different weights.

``torch.distributed.checkpoint.state_dict`` is imported inside the functions that use it: it
loads FSDP and DTensor (~0.6 s for every process), which a run that stops at a bad argument or
file should not pay.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from common.dist import (DistInfo, all_gather_object, broadcast_object, stop_if_any_rank_failed,
                         stop_unless_all_ranks_agree, tensor_digest)
from common.errors import UserError
from common.parallel import full_tensors, is_sharded, unwrap
from common.preempt import EpochProgress
from common.rng import capture_rng, restore_rng

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


def _gather_per_rank(dist: DistInfo, sums: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every rank's RNG state and running epoch sums, in rank order, for rank 0 to write."""
    local = {"rng": _plain_rng(capture_rng(dist.device)), "sums": sums}
    if not dist.is_distributed:
        return [local]
    states: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(states, local)
    return states


def _plain_rng(state: dict[str, Any]) -> dict[str, Any]:
    """NumPy's state tuple holds an array: store its key as a tensor (weights_only loads it)."""
    name, key, pos, has_gauss, cached = state["numpy"]
    return {**state, "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos),
                               int(has_gauss), float(cached))}


def _rng_from_plain(state: dict[str, Any]) -> dict[str, Any]:
    name, key, pos, has_gauss, cached = state["numpy"]
    return {**state, "numpy": (name, key.numpy().astype(np.uint32), pos, has_gauss, cached)}


def config_dict(cfg: Any) -> dict[str, Any]:
    """A program's Config as a dict of plain values for a checkpoint: paths become strings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}


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


def _write_atomically(out_dir: Path, payload: dict[str, Any]) -> str | None:
    """Write ``payload`` as the newest checkpoint; return None, or why the write failed.

    On failure the temporary file is removed and the checkpoints in place are untouched: the
    rename of the newest to ``checkpoint.prev.pt`` happens only after a complete write.
    """
    out_dir = Path(out_dir)
    tmp = out_dir / f".{CHECKPOINT}.tmp"
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(payload, writer)
            f.flush()
            os.fsync(f.fileno())
        if (out_dir / CHECKPOINT).exists():
            os.replace(out_dir / CHECKPOINT, out_dir / PREVIOUS)
        os.replace(tmp, out_dir / CHECKPOINT)
        return None
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else err
        if isinstance(cause, RuntimeError):
            raise  # not an I/O failure: a bug, with its traceback
        kept = "the previous checkpoint is kept" if (out_dir / CHECKPOINT).exists() else "no checkpoint was kept"
        return (f"{out_dir / CHECKPOINT}: cannot write the checkpoint ({cause.strerror or cause}); "
                f"{kept}; free space (or pick another --out-dir) and resume with --resume")


def save_checkpoint(out_dir: Path, state: dict[str, Any], dist: DistInfo,
                    progress: EpochProgress | None = None) -> None:
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
        problem = _write_atomically(out_dir, {
            **state, "rng": [r["rng"] for r in per_rank], "world_size": dist.world_size,
            "step_in_epoch": progress.step if progress is not None else 0,
            "epoch_sums": [r["sums"] for r in per_rank] if progress is not None else None})
    # Rank 0's verdict reaches every rank, and nobody moves on (or exits) until the file is in
    # place or all know it is not.
    stop_if_any_rank_failed(problem, dist)


def load_tensors_file(path: Path | io.BytesIO, map_location: torch.device | str = "cpu",
                      name: str | Path | None = None) -> Any:
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
        raise UserError(f"{name or path}: refused to load: it holds {what}, and unpickling could run code; "
                        "this project's files hold only tensors and plain values (files written "
                        "before that format are refused too: train again to write a new one)") from None


def _try_load(path: Path | io.BytesIO, map_location: torch.device | str,
              name: str | Path | None = None) -> dict[str, Any] | None:
    try:
        state = load_tensors_file(path, map_location, name)
    except UserError:
        raise  # refused as unsafe: never fall back silently past a doctored file
    except Exception:  # noqa: BLE001 - any failure to read means "not a good checkpoint"
        return None
    return state if isinstance(state, dict) and "model" in state else None


def load_checkpoint(
    path: Path, map_location: torch.device | str, expect_meta: dict[str, Any]
) -> dict[str, Any]:
    """Load ``path``, or the previous checkpoint beside it if ``path`` is missing or corrupt.

    Raises UserError when neither loads, or when the checkpoint's ``meta`` differs from
    ``expect_meta`` (a checkpoint of another program or architecture).
    """
    path = Path(path)
    candidates = [path] if path.name != CHECKPOINT else [path, path.with_name(PREVIOUS)]
    for candidate in candidates:
        if not candidate.exists():
            continue
        state = _try_load(candidate, map_location)
        if state is None:
            continue
        _check_meta(state, expect_meta, candidate)
        state["loaded_from"] = str(candidate)
        return state
    raise UserError(f"--resume: no loadable checkpoint at {path} (corrupt or truncated)")


def require_keys(state: dict[str, Any], keys: tuple[str, ...], program: str) -> None:
    """UserError naming the checkpoint when it lacks any of ``keys`` (written by something else)."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise UserError(f"{state.get('loaded_from', 'checkpoint')}: lacks {', '.join(map(repr, missing))}, "
                        f"so it was not written by this version of {program}/train.py; pass a "
                        f"{program} run directory or checkpoint.pt, or train again")


def _check_meta(state: dict[str, Any], expect_meta: dict[str, Any], path: Path | str) -> None:
    """Refuse a checkpoint of another program or architecture with one clear line."""
    meta = state.get("meta", {})
    mismatched = {k: (meta.get(k), v) for k, v in expect_meta.items() if meta.get(k) != v}
    if mismatched:
        what = ", ".join(f"{k} is {got!r}, expected {want!r}" for k, (got, want) in mismatched.items())
        raise UserError(f"--resume {path}: checkpoint does not match this run ({what})")


def restore_rng_for_rank(state: dict[str, Any], dist: DistInfo) -> None:
    """Restore this rank's RNG from a checkpoint written at the same world size.

    At a different world size the per-rank streams cannot line up; the generators are then left
    as seeded, and the data order (which depends only on seed and epoch) is still identical.
    """
    if state.get("world_size") == dist.world_size:
        restore_rng(_rng_from_plain(state["rng"][dist.rank]), dist.device)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights by parameter name, on CPU for a sharded model.

    Call on every rank. Under FSDP the tensors are gathered to rank 0 and the other ranks get
    an empty dict (``common.parallel.local_copy`` gives every rank the whole model); otherwise
    every rank gets the full dict.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    inner = unwrap(model)
    return get_model_state_dict(inner, options=_full_state_options(inner, gather_to_rank0=True))


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict (``full_model_state``'s) into a plain, DDP or FSDP model.

    Under FSDP each rank keeps its shard of ``state``; call on every rank with the whole dict.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    # set_model_state_dict distributes the full tensors in place (FSDP), so hand it copies.
    set_model_state_dict(unwrap(model), dict(state), options=_full_state_options(model))


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                   meta: dict[str, Any], scheduler: Any = None, **extra: Any) -> dict[str, Any]:
    """The dict ``save_checkpoint`` expects: full weights, optimizer, scheduler, epoch.

    Call on every rank (with FSDP, gathering the full state is a collective). Weights and
    optimizer state are *full* state dicts keyed by parameter name, without DDP's ``module.``
    prefix, so a checkpoint written under DDP or FSDP at any world size resumes under either at
    any other. ``epoch`` is the last *completed* epoch; ``extra`` carries program state such as
    the best-so-far weights for early stopping.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    inner = unwrap(model)
    options = _full_state_options(inner, gather_to_rank0=True)
    return {
        "model": full_model_state(inner),
        "optimizer": get_optimizer_state_dict(inner, optimizer, options=options),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "meta": meta,
        **extra,
    }


def _candidates(resume: str, out_dir: Path) -> list[Path]:
    """Where ``--resume`` looks on this rank, newest first: ``auto`` = this run's checkpoints."""
    if resume == "auto":
        return [Path(out_dir) / CHECKPOINT, Path(out_dir) / PREVIOUS]
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT
    return [path, path.with_name(PREVIOUS)] if path.name == CHECKPOINT else [path]


def _newest_local(resume: str, out_dir: Path) -> tuple[dict[str, Any] | None, bytes | None, bool]:
    """This rank's newest checkpoint that loads: ``(report, file bytes, any candidate exists)``.

    The report (epoch, step, SHA-256 of the file, path) is what the ranks compare; the bytes
    are kept for sending to ranks that lack the file. Loaded on the CPU: only the chosen one is
    loaded again, onto the device.
    """
    found = False
    for candidate in _candidates(resume, out_dir):
        if not candidate.is_file():
            continue
        found = True
        try:
            blob = candidate.read_bytes()
        except OSError:
            continue
        try:
            state = _try_load(io.BytesIO(blob), "cpu", candidate)
        except UserError as refused:  # a file that would run code: every rank must hear of it
            return {"refused": str(refused)}, None, found
        if state is None:
            continue
        report = {"epoch": state.get("epoch"), "step": state.get("step_in_epoch", 0), "path": str(candidate),
                  "sha256": hashlib.sha256(blob).hexdigest()}
        return report, blob, found
    return None, None, found


def agreed_checkpoint(resume: str | None, out_dir: Path, dist: DistInfo,
                      expect_meta: dict[str, Any]) -> dict[str, Any] | None:
    """The one checkpoint every rank resumes from; call on every rank (it is a collective).

    Each rank looks where ``--resume`` says (``auto``: its own ``out_dir``, newest that loads:
    ``checkpoint.pt``, then ``checkpoint.prev.pt``). Rank 0's rule, applied identically on
    every rank from the gathered reports: the newest (highest epoch; ties to the lowest rank,
    so rank 0's own file when it has one). The file's bytes go from the rank that holds it to
    every rank whose copy is missing or differs (a broadcast; these checkpoints are at most tens
    of MB), so nodes without a shared filesystem resume from the same state. Every rank then
    loads the same bytes, so a checkpoint of another program fails the same way everywhere.

    Returns the loaded state (on ``dist.device``; ``state["loaded_from"]`` names the chosen
    file, ``state["sent_by"]`` the rank it came from), or None when there is nothing to resume
    (``--resume`` absent, or ``auto`` and no rank has a checkpoint). Raises UserError on every
    rank when an explicit ``--resume PATH`` exists nowhere or does not load anywhere.
    """
    if resume is None:
        return None
    report, blob, found = _newest_local(resume, out_dir)
    reports = all_gather_object({"report": report, "found": found}, dist)
    refused = [r["report"]["refused"] for r in reports if r["report"] and "refused" in r["report"]]
    if refused:
        raise UserError(refused[0])  # on every rank: never resume past a doctored file
    held = [(r["report"]["epoch"] if r["report"]["epoch"] is not None else -1, r["report"]["step"] or 0,
             -rank, rank) for rank, r in enumerate(reports) if r["report"] is not None]
    if not held:
        if resume == "auto":
            return None
        where = _candidates(resume, out_dir)[0]
        if any(r["found"] for r in reports):
            raise UserError(f"--resume: no loadable checkpoint at {where} (corrupt or truncated)")
        raise UserError(f"--resume {resume}: no checkpoint found at {where}"
                        + (" on any node" if dist.is_distributed else ""))
    source = max(held)[-1]
    chosen = reports[source]["report"]
    if any(r["report"] is None or r["report"]["sha256"] != chosen["sha256"] for r in reports):
        received = broadcast_object(blob if dist.rank == source else None, dist, src=source)
        if report is None or report["sha256"] != chosen["sha256"]:
            blob = received
    state = _try_load(io.BytesIO(blob), dist.device)
    if state is None:  # it loaded on the source: only a transfer gone wrong ends here
        raise UserError(f"--resume: the checkpoint sent by rank {source} did not load on rank {dist.rank}")
    _check_meta(state, expect_meta, chosen["path"])
    state["loaded_from"], state["sent_by"] = chosen["path"], source
    return state


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
    view = (f"epoch {state.get('epoch') if state else None}, "
            f"step {state.get('step_in_epoch', 0) if state else None}, "
            f"weights {weights_checksum(model)[:16]}")
    stop_unless_all_ranks_agree(view, "the state training starts from (every rank must resume from "
                                "the same checkpoint)", dist)


def resume_from(resume: str | None, out_dir: Path, dist: DistInfo, meta: dict[str, Any],
                model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any = None) -> dict[str, Any] | None:
    """Apply ``--resume``: load weights, optimizer, scheduler and RNG in place, on every rank.

    The checkpoint is the one ``agreed_checkpoint`` chose for the whole job, and before this
    returns the ranks have checked that they hold the same weights (``check_ranks_agree``).
    Returns the checkpoint (read ``state["epoch"] + 1`` to continue, and any extra keys), or
    None when there is nothing to resume from (``--resume`` absent, or ``auto`` with no file).
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = agreed_checkpoint(resume, out_dir, dist, meta)
    if state is not None:
        path = state["loaded_from"]
        require_keys(state, ("model", "optimizer", "epoch"), meta["program"])
        inner = unwrap(model)
        try:
            load_model_state(inner, state["model"])
            # Like the weights, the optimizer state is distributed in place: hand it a copy.
            set_optimizer_state_dict(inner, optimizer, _copy_nested(state["optimizer"]),
                                     options=_full_state_options(inner))
        except (RuntimeError, ValueError, KeyError) as err:
            first_line = str(err).strip().splitlines()[0]
            raise UserError(f"--resume {path}: checkpoint does not fit this model ({first_line})") from None
        if scheduler is not None and state.get("scheduler") is not None:
            _check_schedule_length(state["scheduler"], scheduler, path)
            scheduler.load_state_dict(state["scheduler"])
        restore_rng_for_rank(state, dist)
    check_ranks_agree(state, model, dist)
    return state


def _check_schedule_length(saved: dict[str, Any], scheduler: Any, path: Path) -> None:
    """A schedule with a fixed length (OneCycleLR) cannot continue at another length.

    Loading it anyway would keep the saved length and fail with a traceback past its end.
    """
    saved_steps, steps = saved.get("total_steps"), getattr(scheduler, "total_steps", None)
    if saved_steps is not None and steps is not None and saved_steps != steps:
        raise UserError(f"--resume {path}: its learning-rate schedule spans {saved_steps} steps, this "
                        f"run's {steps}; resume with the --epochs and --batch-size it was started with")


def _full_state_options(model: torch.nn.Module, gather_to_rank0: bool = False):
    """Whole tensors keyed by parameter name; with ``gather_to_rank0``, gathered to rank 0 only.

    Rank 0 is the rank that writes. cpu_offload is what gathers there, and it needs a process
    group, so it is only asked for when the model is sharded.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    offload = gather_to_rank0 and tdist.is_initialized() and is_sharded(model)
    return StateDictOptions(full_state_dict=True, cpu_offload=offload)


def _copy_nested(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_nested(v) for v in value]
    return value
