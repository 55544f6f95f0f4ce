"""--eval-only, the same in every program: evaluate a saved run's weights, write eval.json.

``--eval-only --resume PATH`` loads the one checkpoint every rank agrees on
(``common.resume.agreed_checkpoint``: the file is sent to ranks that cannot read it),
rebuilds the evaluated run's Config from the one saved in it (``RunConfig.for_evaluation``),
hands both to the program's ``evaluate_checkpoint``, which builds the data and model from that
Config, loads the weights and runs the program's ``evaluate``, and writes what it returns to
``eval.json`` in --out-dir (rank 0), with the checkpoint's path and the world size. The
evaluated run's own files (metrics.jsonl, summary.json, plots) are left as they are.
"""
from __future__ import annotations

from typing import Any, Callable

from common.checkpoint import require_keys
from common.resume import agreed_checkpoint
from common.config import RunConfig
from common.dist import DistInfo
from common.errors import UserError
from common.report import write_json_atomic

EvaluateCheckpoint = Callable[[RunConfig, dict[str, Any], DistInfo], dict[str, Any]]


def run_eval_only(cfg: RunConfig, dist: DistInfo, evaluate_checkpoint: EvaluateCheckpoint,
                  required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Evaluate the checkpoint ``cfg.resume`` names with ``evaluate_checkpoint(saved_cfg, state,
    dist)``; call on every rank. ``required``: the checkpoint keys it reads besides ``model``
    and ``config`` (a checkpoint without them is one clear error). Returns eval.json's content.
    """
    state = agreed_checkpoint(cfg.resume, cfg.out_dir, dist, {"program": cfg.PROGRAM})
    if state is None:  # --resume auto and no rank has a checkpoint in its --out-dir
        raise UserError(f"--eval-only --resume: no checkpoint in {cfg.out_dir} on any node")
    require_keys(state, ("model", "config", *required), cfg.PROGRAM)
    saved = cfg.for_evaluation(state["config"], state["loaded_from"])
    results = {**evaluate_checkpoint(saved, state, dist), "checkpoint": state["loaded_from"],
               "world_size": dist.world_size}
    if dist.is_main:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg.out_dir / "eval.json", results)
    return results
