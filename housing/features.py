"""Rank the feature groups three ways and choose a subset by validation RMSE.

1. |Pearson correlation| with the log price, and 2. mutual information with it (scikit-learn's
   ``mutual_info_regression``), both on the training rows; a group with several columns (the
   one-hot ``ocean_proximity``, the location clusters) scores its best column.
3. Permutation importance of the trained network: how much the validation RMSE rises when a
   group's columns are shuffled together across rows (mean of ``--repeats`` shuffles).

Then the groups are added in order of permutation importance and each prefix (the top k
groups) is trained from scratch; the subset with the lowest validation RMSE wins. Both the
importance computation and the subset trainings are spread across the ranks and gathered with
torch.distributed. Writes ``features.md`` and ``plots/feature_importance.png``.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from common.config import make_parser
from common.console import get_logger
from common.dist import DistInfo, distributed
from common.errors import UserError, run_main
from common.figures import pyplot, save_figure
from common.metrics import gather_tensors
from common.parallel import local_copy
from common.records import RunRecorder
from housing import data as hdata
from housing.fit import fit, this_process_only
from housing.metrics import split_metrics
from housing.train import DEFAULTS, Config, build_data

EXAMPLE = """example:
  torchrun --nproc_per_node=2 housing/features.py --data-dir ../shared/data --out-dir runs/housing-features
  then: torchrun --nproc_per_node=2 housing/train.py --features <the chosen list in features.md>
"""


def parse_args(argv: list[str] | None = None) -> tuple[Config, int, list[int]]:
    parser = make_parser(
        __doc__.splitlines()[0] + "\n\n" + EXAMPLE, {**DEFAULTS, "epochs": 40, "out_dir": "runs/housing-features"}
    )
    Config.add_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="shuffles per group (permutation importance)")
    parser.add_argument(
        "--subset-sizes", default="3,5,7,9,11,13,all", help="numbers of top-ranked groups to try ('all' = every group)"
    )
    args = parser.parse_args(argv)
    cfg = Config.from_args(args, baselines=False)  # its own runs fit no baselines
    n_groups = len(cfg.features)
    try:
        sizes = sorted({n_groups if s.strip() == "all" else int(s) for s in args.subset_sizes.split(",")})
    except ValueError:
        raise UserError(f"--subset-sizes {args.subset_sizes!r}: expected integers or 'all'") from None
    if args.repeats < 1 or not sizes or sizes[0] < 1:
        raise UserError("--repeats and every --subset-sizes entry must be >= 1")
    return cfg, args.repeats, [min(s, n_groups) for s in sizes]


def group_slices(data: hdata.HousingData, groups: tuple[str, ...]) -> dict[str, list[int]]:
    """Each group's column positions in the net's input (data.columns order)."""
    position = {c: i for i, c in enumerate(data.columns)}
    return {g: [position[c] for c in hdata.group_columns(data.preprocessor, [g])] for g in groups}


def filter_scores(data: hdata.HousingData, slices: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    """|correlation| and mutual information with log price on training rows, best column per group."""
    from sklearn.feature_selection import mutual_info_regression

    x, y = data.train.x.numpy().astype(np.float64), data.train.y.numpy().astype(np.float64)
    corr = np.nan_to_num(np.abs([np.corrcoef(x[:, j], y)[0, 1] for j in range(x.shape[1])]))
    mi = mutual_info_regression(x, y, random_state=seed)
    return {
        "abs_corr": np.array([corr[c].max() for c in slices.values()]),
        "mutual_info": np.array([mi[c].max() for c in slices.values()]),
    }


def permutation_importance(
    model, data: hdata.HousingData, slices: dict[str, list[int]], repeats: int, seed: int, dist: DistInfo
) -> torch.Tensor:
    """Mean rise in validation RMSE ($) per group; groups split across ranks, then gathered."""
    # Each rank shuffles its own groups, a different number on each, so it evaluates a plain
    # copy of the whole model in a world of one: gathering an FSDP model (a collective) inside
    # the loop would be called a different number of times on each rank and hang.
    model = local_copy(model).double().eval()  # every rank, once; float64 as train.py evaluates
    solo = this_process_only(dist)
    base = split_metrics(model, data.val, data, solo)["rmse"]
    rows = []
    for g, (_name, cols) in enumerate(slices.items()):
        if g % dist.world_size != dist.rank:
            continue
        rises = []
        for r in range(repeats):
            order = torch.randperm(len(data.val.y), generator=torch.Generator().manual_seed(seed * 1000 + g * 10 + r))
            x = data.val.x.clone()
            x[:, cols] = data.val.x[order][:, cols]
            shuffled = replace(data.val, x=x)
            rises.append(split_metrics(model, shuffled, data, solo)["rmse"] - base)
        rows.append([g, float(np.mean(rises)), float(np.std(rises))])
    gathered = gather_tensors(torch.tensor(rows, dtype=torch.float64).reshape(-1, 3), dist)
    return gathered[torch.argsort(gathered[:, 0])][:, 1:]


def try_subsets(cfg: Config, ranking: list[str], sizes: list[int], dist: DistInfo, log) -> torch.Tensor:
    """Train the top-k groups for each k (k-th size on rank k mod world); rows [k, val RMSE]."""
    rows = []
    for i, k in enumerate(sizes):
        if i % dist.world_size != dist.rank:
            continue
        sub_cfg = replace(cfg, features=tuple(ranking[:k]))
        data = build_data(sub_cfg, this_process_only(dist))  # only this rank trains it
        _, stopper = fit(sub_cfg, data, this_process_only(dist))
        rows.append([k, stopper.best_rmse])
        log.info(f"top {k} groups: val RMSE ${stopper.best_rmse:,.0f}")
    gathered = gather_tensors(torch.tensor(rows, dtype=torch.float64).reshape(-1, 2), dist)
    return gathered[torch.argsort(gathered[:, 0])]


def plot_importance(names: list[str], scores: dict[str, np.ndarray], path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, len(scores), figsize=(5 * len(scores), 0.35 * len(names) + 1.5), sharey=True)
    order = np.argsort(scores["permutation_rmse_rise"])
    for ax, (label, values) in zip(axes, scores.items()):
        ax.barh([names[i] for i in order], values[order], color="tab:blue")
        ax.set_xlabel(label.replace("_", " ") + (" ($)" if "rmse" in label else ""))
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("housing feature groups (sorted by permutation importance)")
    save_figure(fig, path)


def main() -> None:
    cfg, repeats, sizes = parse_args()
    started = time.time()
    with distributed(cfg.device, cfg.dist_timeout) as dist:
        log = get_logger("housing.features", dist)
        data = build_data(cfg, dist)
        recorder = RunRecorder(cfg.out_dir, dist)
        slices = group_slices(data, cfg.features)
        names = list(slices)
        log.info(f"training the reference net on {len(names)} feature groups")
        model, stopper = fit(cfg, data, dist)
        scores = filter_scores(data, slices, cfg.seed)
        perm = permutation_importance(model, data, slices, repeats, cfg.seed, dist)
        scores["permutation_rmse_rise"] = perm[:, 0].numpy()
        ranking = [names[i] for i in np.argsort(-scores["permutation_rmse_rise"], kind="stable")]
        subsets = try_subsets(cfg, ranking, sizes, dist, log)
        best_k = int(subsets[torch.argmin(subsets[:, 1]), 0])
        chosen = ranking[:best_k]

        table = [
            "# Feature groups of the housing MLP",
            "",
            f"Reference net: all {len(names)} groups, validation RMSE ${stopper.best_rmse:,.0f}. "
            "Correlation (absolute) and MI: against log price on training rows (best column of the group). "
            f"Permutation: rise in validation RMSE when the group is shuffled (mean ± sd of {repeats}).",
            "",
            "| place | group | columns | permutation: RMSE rise ($) | abs. correlation | mutual information |",
            "| ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        for place, name in enumerate(ranking, start=1):
            i = names.index(name)
            table.append(
                f"| {place} | {name} | {len(slices[name])} | {perm[i, 0]:,.0f} ± {perm[i, 1]:,.0f} | "
                f"{scores['abs_corr'][i]:.3f} | {scores['mutual_info'][i]:.3f} |"
            )
        table += [
            "",
            "## Subsets (top k groups by permutation importance), trained from scratch",
            "",
            "| k | validation RMSE ($) |",
            "| ---: | ---: |",
        ]
        table += [f"| {int(k)} | {rmse:,.0f} |" for k, rmse in subsets.tolist()]
        table += [
            "",
            f"Chosen: the top {best_k} groups (lowest validation RMSE). Train with:",
            "",
            f"    torchrun --nproc_per_node=2 housing/train.py --data-dir DIR --features {','.join(chosen)}",
            "",
        ]
        recorder.write_text("features.md", "\n".join(table))
        if dist.is_main:
            plot_importance(names, scores, recorder.plots_dir / "feature_importance.png")
        recorder.write_summary(
            {
                "ranking": ranking,
                "scores": {k: dict(zip(names, v.tolist())) for k, v in scores.items()},
                "subsets": subsets.tolist(),
                "chosen": chosen,
                "wall_time_s": time.time() - started,
            },
            cfg,
        )
        log.info(f"chose {best_k} groups; wrote {cfg.out_dir}/features.md ({time.time() - started:.0f}s)")


if __name__ == "__main__":
    run_main(main)
