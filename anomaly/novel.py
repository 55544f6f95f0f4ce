"""Novel attacks: how well does each detector catch a kind of attack it was never shown?

For each attack category, train the hybrid detector with that category removed from train and
validation (``train.py --holdout CAT``), choose the thresholds on that validation split, and
measure on the full test split the share of the held-out category detected and the share of
normal test rows flagged (false alarms). Four detectors come out of each run: the hybrid, and
what it holds, each calibrated as a detector of those parts alone would be: the classifier with
its members' disagreement as the one novelty watcher, the classifier alone, and the autoencoder
alone (best-F1 validation thresholds). The parts train on disjoint parameters with a summed
loss, so each learns what it would alone (the autoencoder never sees an attack row, held out or
not).

    torchrun --nproc_per_node=2 anomaly/novel.py --data-dir ../shared/data

Every other option is ``train.py``'s (``--detector`` is always hybrid here). Writes
``novel.md``, ``novel.json`` and ``plots/novel.png`` into --out-dir, one run directory per
category under it (``holdout-<category>/``). ``--resume`` continues an interrupted study: a
finished category is only evaluated again.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from anomaly import train
from anomaly.data import attack_categories
from common.console import get_logger
from common.dist import distributed
from common.errors import UserError, run_main
from common.figures import pyplot, save_figure
from common.files import write_text_atomic
from common.records import write_json_atomic

EXAMPLE = "torchrun --nproc_per_node=2 anomaly/novel.py --data-dir ../shared/data"
DETECTORS = ("hybrid", "classifier+disagreement", "classifier", "autoencoder")


def parse_args(argv: list[str] | None = None) -> tuple[train.Config, list[str] | None]:
    """train.py's options (its --out-dir defaults to runs/anomaly-novel) plus --categories."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(
            "train.py's options apply; this program adds:\n  --categories A,B   "
            "only these attack categories (default: every one in the data)\n"
        )
        train.parse_args(["--help"])
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--categories", default=None)
    extra.add_argument("--detector", default="hybrid")
    extra.add_argument("--holdout", default=None)
    own, rest = extra.parse_known_args(argv)
    if own.detector != "hybrid" or own.holdout is not None:
        raise UserError(
            "anomaly/novel.py always trains the hybrid and chooses --holdout itself; drop --detector and --holdout"
        )
    if not any(a == "--out-dir" or a.startswith("--out-dir=") for a in rest):
        rest += ["--out-dir", "runs/anomaly-novel"]
    cfg = train.parse_args(rest + ["--detector", "hybrid"])
    categories = own.categories.split(",") if own.categories else None
    return cfg, categories


def held_out_rates(summary: dict, category: str) -> dict[str, dict[str, float]]:
    """Per detector: detection rate of ``category`` and false-alarm rate on normal test rows."""
    out = {
        "hybrid": {
            "detected": summary["per_attack_cat"][category]["detection_rate"],
            "false_alarms": summary["test"]["false_alarm_rate"],
            "f1": summary["test"]["f1"],
        }
    }
    for part, measured in summary["parts"].items():
        out[part] = {
            "detected": measured["per_attack_cat"][category]["detection_rate"],
            "false_alarms": measured["test"]["false_alarm_rate"],
            "f1": measured["test"]["f1"],
        }
    return out


def markdown(rows: dict[str, dict], novelty_alarms: float) -> str:
    lines = [
        "Each row: that attack category removed from train and validation; test keeps it. "
        "Detected = share of the held-out category's test rows flagged; false alarms = share "
        "of normal test rows flagged; thresholds from validation (the novelty watchers flag "
        f"{novelty_alarms:g} of normal validation rows: the hybrid's members' disagreement "
        "and autoencoder half each, classifier+disagreement's all of it).",
        "",
        "| held out | test rows | " + " | ".join(f"{d} detected | {d} false alarms" for d in DETECTORS) + " |",
        "| --- | ---: | " + " | ".join("---: | ---:" for _ in DETECTORS) + " |",
    ]
    for category, row in rows.items():
        cells = " | ".join(
            f"{row['rates'][d]['detected']:.3f} | {row['rates'][d]['false_alarms']:.3f}" for d in DETECTORS
        )
        lines.append(f"| {category} | {row['rows']:,} | {cells} |")
    return "\n".join(lines) + "\n"


def bar_chart(rows: dict[str, dict], path: Path) -> None:
    """Detection rate of each held-out category, one bar per detector."""
    plt = pyplot()
    names = list(rows)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(DETECTORS)
    for i, detector in enumerate(DETECTORS):
        rates = [rows[n]["rates"][detector]["detected"] for n in names]
        alarms = np.mean([rows[n]["rates"][detector]["false_alarms"] for n in names])
        ax.bar(
            np.arange(len(names)) + (i - (len(DETECTORS) - 1) / 2) * width,
            rates,
            width,
            label=f"{detector} (false alarms {alarms:.1%} of normal rows, mean)",
        )
    ax.set_xticks(np.arange(len(names)), names, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out category detected")
    ax.set_title("attacks of a kind never seen in training: share detected on test")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    save_figure(fig, path)


def main() -> None:
    cfg, categories = parse_args()
    with distributed(cfg.device, cfg.dist_timeout) as dist:
        log = get_logger("anomaly.novel", dist)
        # Every attack category of the test split (the same on every rank), checked up front.
        splits = train.split_data(cfg.data_dir, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.max_rows, cfg.split)
        known = attack_categories(splits.test)
        unknown = sorted(set(categories or []) - set(known))
        if unknown:
            raise UserError(
                f"--categories: {', '.join(unknown)} not in this test split; expected some of {', '.join(known)}"
            )
        categories = categories or known
        rows = {}
        for category in categories:
            run_dir = cfg.out_dir / f"holdout-{category}"
            log.info("holding out %s -> %s", category, run_dir)
            summary = train.train(dataclasses.replace(cfg, holdout=category, out_dir=run_dir), dist)
            rows[category] = {
                "rows": summary["per_attack_cat"][category]["rows"],
                "rates": held_out_rates(summary, category),
            }
        if dist.is_main:
            table = markdown(rows, cfg.novelty_alarms)
            write_json_atomic(cfg.out_dir / "novel.json", {"config": dataclasses.asdict(cfg), "rows": rows})
            write_text_atomic(cfg.out_dir / "novel.md", table)
            (cfg.out_dir / "plots").mkdir(parents=True, exist_ok=True)
            bar_chart(rows, cfg.out_dir / "plots" / "novel.png")
            print(table)


if __name__ == "__main__":
    run_main(main)
