"""Resuming: one checkpoint for the whole job, applied on every rank and checked.

Resuming is one decision per job, not one per rank (``agreed_checkpoint``): every rank reports
the newest checkpoint that loads where *it* looks (its own ``--out-dir``: on a cluster without
a shared filesystem each node has its own), rank 0's choice (the newest, ties to the lowest
rank) is applied everywhere, and the file's bytes are broadcast from the rank that holds it to
ranks whose copy differs or is missing. ``check_ranks_agree`` then compares epoch, step and a
checksum of the weights on every rank before training starts: a disagreement is one ``error:``
line on every rank, never two replicas silently training different weights.

``torch.distributed.checkpoint.state_dict`` is imported inside ``resume_from``: it loads FSDP
and DTensor (~0.6 s for every process), which a run that stops at a bad argument or file should
not pay.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import (CHECKPOINT, PREVIOUS, _check_meta, _full_state_options, _try_load,
                               load_model_state, require_keys, restore_rng_for_rank)
from common.config import RunConfig
from common.dist import DistInfo, all_gather_object, broadcast_object, stop_unless_all_ranks_agree, tensor_digest
from common.errors import UserError
from common.parallel import full_tensors, is_sharded, unwrap


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


def agreed_checkpoint(resume: str | None, out_dir: Path, dist: DistInfo, expect_meta: dict[str, Any],
                      config: RunConfig | None = None) -> dict[str, Any] | None:
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
    # On the CPU: the model and optimizer loaders copy what they own to their parameters'
    # device; RNG states, fitted transforms and step counters stay host objects.
    state = _try_load(io.BytesIO(blob), "cpu")
    if state is None:  # it loaded on the source: only a transfer gone wrong ends here
        raise UserError(f"--resume: the checkpoint sent by rank {source} did not load on rank {dist.rank}")
    _check_meta(state, {"program": expect_meta["program"]}, chosen["path"])
    if config is not None:
        check_same_settings(config, state, chosen["path"])
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
                scheduler: Any = None, config: RunConfig | None = None) -> dict[str, Any] | None:
    """Apply ``--resume``: load weights, optimizer, scheduler and RNG in place, on every rank.

    The checkpoint is the one ``agreed_checkpoint`` chose for the whole job, and before this
    returns the ranks have checked that they hold the same weights (``check_ranks_agree``).
    With ``config`` (this launch's), a checkpoint whose run had other settings for the data or
    the optimisation is refused (``check_same_settings``) before anything is loaded.
    Returns the checkpoint (read ``state["epoch"] + 1`` to continue, and any extra keys), or
    None when there is nothing to resume from (``--resume`` absent, or ``auto`` with no file).
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = agreed_checkpoint(resume, out_dir, dist, meta, config)
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
        raise UserError(f"--resume {path}: --{name.replace('_', '-')} is {value!r} here but {saved!r} in the "
                        f"run being resumed{more}; resume with the run's settings, or start a new run "
                        "in another --out-dir")


def _check_schedule_length(saved: dict[str, Any], scheduler: Any, path: Path) -> None:
    """A schedule with a fixed length (OneCycleLR) cannot continue at another length.

    Loading it anyway would keep the saved length and fail with a traceback past its end.
    """
    saved_steps, steps = saved.get("total_steps"), getattr(scheduler, "total_steps", None)
    if saved_steps is not None and steps is not None and saved_steps != steps:
        raise UserError(f"--resume {path}: its learning-rate schedule spans {saved_steps} steps, this "
                        f"run's {steps}; resume with the --epochs and --batch-size it was started with")


def _copy_nested(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_nested(v) for v in value]
    return value
