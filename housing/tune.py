"""Grid search over architecture and optimiser settings, the grid spread across the ranks.

Each rank trains its own share of the grid points (point i on rank i mod world size) as
independent single-process runs; the validation results are gathered with torch.distributed,
ranked, and written as ``tune.md``. The best point is then retrained by all ranks together (DDP)
and evaluated once on the test split, next to the LinearRegression and HistGradientBoosting
baselines.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from typing import Any

import torch

from common.config import make_parser
from common.console import get_logger, optional_extra
from common.dist import DistInfo, distributed
from common.errors import UserError, run_main
from common.metrics import gather_tensors
from common.parallel import local_copy
from common.records import RunRecorder
from housing import report
from housing.fit import fit, this_process_only
from housing.metrics import split_metrics
from housing.train import DEFAULTS, Config, build_data

EXAMPLE = """example:
  torchrun --nproc_per_node=2 housing/tune.py --data-dir ../shared/data --out-dir runs/housing-tune
  torchrun --nproc_per_node=2 housing/tune.py --grid "width=128,256 lr=0.002,0.004" --epochs 20
  torchrun --nproc_per_node=2 housing/tune.py --grid "ensemble=1,8 ensemble_mode=mini,packed width=128 depth=2"
"""
# The ingredients of common/tabular.py on and off, around the default (PLE embedding).
DEFAULT_GRID = "embedding=none,ple,periodic quantile=0,1 ensemble=1,8"


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(text)
    return text == "1"


_flag.__name__ = "0 or 1"
TUNABLE = {
    "width": int,
    "depth": int,
    "lr": float,
    "weight_decay": float,
    "dropout": float,
    "batch_size": int,
    "activation": str,
    "norm": str,
    "quantile": _flag,
    "embedding": str,
    "embed_bins": int,
    "embed_dim": int,
    "ensemble": int,
    "ensemble_mode": str,
    "dollar_loss": float,
}


def parse_grid(text: str) -> list[dict[str, Any]]:
    """``"width=128,256 lr=0.002,0.004"`` -> every combination, as a list of overrides."""
    axes: dict[str, list[Any]] = {}
    for item in text.split():
        name, _, values = item.partition("=")
        name = name.replace("-", "_")
        if name not in TUNABLE or not values:
            raise UserError(f"--grid {item!r}: expected NAME=V1,V2 with NAME one of {', '.join(TUNABLE)}")
        try:
            axes[name] = [TUNABLE[name](v) for v in values.split(",")]
        except ValueError:
            raise UserError(f"--grid {item!r}: values of {name} must be {TUNABLE[name].__name__}") from None
    if not axes:
        raise UserError('--grid is empty; example: --grid "width=128,256 lr=0.002,0.004"')
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def parse_args(argv: list[str] | None = None) -> tuple[Config, list[dict[str, Any]]]:
    parser = make_parser(
        __doc__.splitlines()[0] + "\n\n" + EXAMPLE, {**DEFAULTS, "epochs": 60, "out_dir": "runs/housing-tune"}
    )
    Config.add_arguments(parser)
    parser.add_argument(
        "--grid", default=DEFAULT_GRID, help="space-separated NAME=V1,V2,... axes; every combination is trained"
    )
    args = parser.parse_args(argv)
    cfg = Config.from_args(args, baselines=True)
    points = parse_grid(args.grid)
    for point in points:  # validate every point before any training
        replace(cfg, **point)
    return cfg, points


def run_my_points(cfg: Config, points: list[dict[str, Any]], data, dist: DistInfo, log) -> torch.Tensor:
    """Train this rank's share of the grid alone; rows of [point, val_rmse, best_epoch, seconds]."""
    rows = []
    mine = list(range(dist.rank, len(points), dist.world_size))
    for i in mine:
        started = time.time()
        _, stopper = fit(replace(cfg, **points[i]), data, this_process_only(dist))
        rows.append([i, stopper.best_rmse, stopper.best_epoch, time.time() - started])
        log.info(
            f"point {i + 1}/{len(points)} {points[i]}: val RMSE ${stopper.best_rmse:,.0f} "
            f"(rank 0's share; {time.time() - started:.1f}s)"
        )
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


def grid_table(points: list[dict[str, Any]], results: torch.Tensor, world_size: int) -> str:
    names = list(points[0])
    lines = [
        "| place | " + " | ".join(names) + " | val RMSE ($) | best epoch | seconds | trained on rank |",
        "| ---: | " + " | ".join("---" for _ in names) + " | ---: | ---: | ---: | ---: |",
    ]
    for place, (i, rmse, epoch, seconds) in enumerate(results.tolist(), start=1):
        values = " | ".join(
            f"{points[int(i)][n]:g}" if not isinstance(points[int(i)][n], str) else points[int(i)][n] for n in names
        )
        lines.append(f"| {place} | {values} | {rmse:,.0f} | {int(epoch) + 1} | {seconds:.1f} | {int(i) % world_size} |")
    return "\n".join(lines)


def main() -> None:
    cfg, points = parse_args()
    started = time.time()
    with distributed(cfg.device, cfg.dist_timeout) as dist:
        log = get_logger("housing.tune", dist)
        data = build_data(cfg, dist)
        recorder = RunRecorder(cfg.out_dir, dist)
        log.info(f"{len(points)} grid points over {dist.world_size} process(es), up to {cfg.epochs} epochs each")
        results = gather_tensors(run_my_points(cfg, points, data, dist, log), dist)
        results = results[torch.argsort(results[:, 1], stable=True)]  # best validation RMSE first
        best = points[int(results[0, 0])]
        log.info(f"best {best}: val RMSE ${results[0, 1]:,.0f}; retraining on all ranks")

        best_cfg = replace(cfg, **best)
        model, stopper = fit(best_cfg, data, dist)
        # The one and only look at the test split (a plain float64 copy, as train.py evaluates).
        test = split_metrics(local_copy(model).double().eval(), data.test, data, dist)
        wall = time.time() - started

        def write_results(baselines: dict | None) -> None:
            """tune.md and summary.json, without the baselines at first, then with them."""
            text = [
                "# Grid search: housing MLP",
                "",
                f"{len(points)} configurations, each trained for up to {cfg.epochs} epochs with "
                f"early stopping (patience {cfg.patience}), global batch {cfg.batch_size} unless "
                f"the grid sets it; ranked by validation RMSE. Spread over {dist.world_size} "
                f"process(es).",
                "",
                grid_table(points, results, dist.world_size),
                "",
                f"Best configuration {best}, retrained on {dist.world_size} process(es) "
                f"(val RMSE ${stopper.best_rmse:,.0f}), evaluated once on test:",
                "",
                report.results_table(test, baselines, best_cfg.arch).split("\n", 2)[2],
            ]
            recorder.write_text("tune.md", "\n".join(text))
            recorder.write_summary(
                {
                    "best": best,
                    "best_val_rmse": stopper.best_rmse,
                    "test": test,
                    "baselines": baselines,
                    "grid": points,
                    "results": results.tolist(),
                    "wall_time_s": wall,
                },
                cfg,
            )

        write_results(None)  # the results reach disk before the extra
        # The baselines: rank 0 alone, after the last collective, so no rank waits on them.
        if dist.is_main:
            baselines = optional_extra("baselines", lambda: report.run_baselines(data, cfg.seed), log)
            if baselines is not None:
                write_results(baselines)
        log.info(f"test RMSE ${test['rmse']:,.0f}; wrote {cfg.out_dir}/tune.md ({time.time() - started:.0f}s)")


if __name__ == "__main__":
    run_main(main)
