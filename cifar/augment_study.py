"""Augmentation study: train with each augmentation switched off in turn, tabulate the difference.

Runs ``cifar/train.py`` once with every augmentation on (the baseline), once per augmentation
with that one off, and re-evaluates the baseline's checkpoint without test-time flips. Each
variant is trained with the same seeds, so the only change is the switch. Writes
``augment_study.md`` (a Markdown table) and ``augment_study.json`` into ``--out-dir``.

Every argument after ``--`` goes to train.py unchanged (the preset, epochs, widths, ...).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common.errors import UserError, run_main
from common.files import write_text_atomic

TRAIN = Path(__file__).resolve().parent / "train.py"
EXAMPLE = """example (2 processes, a short CPU budget, 2 seeds):
  python cifar/augment_study.py --data-dir ../shared/data --nproc 2 --seeds 2 --cutout 8 \\
      -- --preset cpu --epochs 3 --widths 32 64 64
"""


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This script's arguments, and the ones after ``--`` that go to every train.py run."""
    parser = argparse.ArgumentParser(
        description=__doc__ + "\n" + EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--out-dir", type=Path, default=Path("runs/cifar_augment_study"))
    parser.add_argument("--nproc", type=int, default=1, help="processes per training run (torchrun)")
    parser.add_argument("--seeds", type=int, default=1, help="repeat every variant with seeds 0..N-1")
    parser.add_argument("--translate", type=int, default=2, help="baseline random shift, pixels")
    parser.add_argument("--cutout", type=int, default=8, help="baseline cutout square, pixels")
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    if args.nproc < 1 or args.seeds < 1:
        raise UserError("--nproc and --seeds must be >= 1")
    if args.translate < 1 or args.cutout < 1:
        raise UserError("--translate and --cutout give the baseline's (switched on) sizes; use >= 1")
    return args, extra


def run_train(args: argparse.Namespace, train_args: list[str], out: Path) -> dict:
    """One train.py run into ``out``; its summary.json (eval.json for ``--eval-only``), or a
    UserError with its last error line."""
    train_args = [*train_args, "--out-dir", str(out)]
    if args.nproc == 1:
        cmd = [sys.executable, str(TRAIN), *train_args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            str(TRAIN),
            *train_args,
        ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise UserError(f"train.py failed ({' '.join(train_args)}): {lines[-1] if lines else '?'}")
    return json.loads((out / ("eval.json" if "--eval-only" in train_args else "summary.json")).read_text())


def main() -> None:
    args, extra = parse_args()
    variants = {
        "baseline (all on)": [],
        "no random translate": ["--translate", "0"],
        "no horizontal flip": ["--no-flip"],
        "no cutout": ["--cutout", "0"],
    }
    results: dict[str, list[dict]] = {name: [] for name in [*variants, "no test-time flip"]}
    for seed in range(args.seeds):
        for name, switch in variants.items():
            out = args.out_dir / f"seed{seed}" / name.split(" (")[0].replace(" ", "_")
            base = [
                "--data-dir",
                str(args.data_dir),
                "--seed",
                str(seed),
                "--translate",
                str(args.translate),
                "--cutout",
                str(args.cutout),
                *extra,
            ]
            start = time.time()
            summary = run_train(args, [*base, *switch], out)
            summary["run_s"] = time.time() - start
            results[name].append(summary)
            print(f"seed {seed} {name}: test accuracy {summary['test_accuracy']:.4f}", flush=True)
            if not switch:  # the same weights without test-time flips: no retraining needed
                no_tta = run_train(
                    args,
                    [*base, "--eval-only", "--resume", str(out / "checkpoint.pt"), "--no-tta"],
                    out.with_name("no_tta"),
                )
                no_tta["run_s"] = 0.0
                results["no test-time flip"].append(no_tta)
    write_report(args, extra, results)


def write_report(args: argparse.Namespace, extra: list[str], results: dict[str, list[dict]]) -> None:
    def mean_acc(name: str) -> float:
        return statistics.mean(s["test_accuracy"] for s in results[name])

    baseline = mean_acc("baseline (all on)")
    lines = [
        "# CIFAR-10 augmentation study",
        "",
        f"Baseline: translate {args.translate} px, horizontal flip, cutout {args.cutout} px, "
        f"test-time flip; train.py arguments: `{' '.join(extra) or '(defaults)'}`; "
        f"{args.nproc} process(es), {args.seeds} seed(s) per row (mean shown).",
        "",
        "| variant | test accuracy | change vs baseline (points) | train wall time (s) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, runs in results.items():
        acc = mean_acc(name)
        delta = "" if name.startswith("baseline") else f"{100 * (acc - baseline):+.2f}"
        wall = statistics.mean(s["run_s"] for s in runs)
        lines.append(f"| {name} | {acc:.4f} | {delta} | {wall:.0f} |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out_dir / "augment_study.md", "\n".join(lines) + "\n")
    write_text_atomic(
        args.out_dir / "augment_study.json",
        json.dumps({name: [s["test_accuracy"] for s in runs] for name, runs in results.items()}, indent=2),
    )
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
