"""Benchmark housing, cifar and anomaly: throughput, scaling, where a step's time goes, memory.

One command measures every program at world size 1 and 2 (it launches ``python`` and
``torchrun`` itself, one fresh process group per program and world size, so peak memory is per
program) and writes ``<out>/benchmarks.md`` and ``<out>/benchmarks.json``:

  python bench/bench.py --data-dir ../shared/data --out docs/
  python bench/bench.py --data-dir data --device cuda --out docs/   # GPUs, NCCL: benchmarks-cuda.*

What is measured, per program, on its real model, optimizer and data (built by the program's own
``parse_args`` / ``build_data`` / ``build_model``), after a fixed number of warm-up steps:

- a step = get the batch (indexing the in-memory tensors, plus CIFAR's on-device augmentation),
  forward + backward, optimizer step; each part is timed separately;
- communication = (forward + backward of normal DDP steps) - (forward + backward of steps run
  inside ``DistributedDataParallel.no_sync()``, which skips the gradient all-reduce). The two
  kinds of step alternate, so both see the same machine conditions. This is the *exposed* cost of
  the all-reduce (the part not hidden behind backward), including any wait for a slower rank;
- samples/s per process = per-rank batch / mean step time; scaling efficiency =
  total samples/s at world size N / (N x total samples/s at world size 1), with the same *global*
  batch (the programs' default), so perfect scaling halves the step time on 2 processes;
- peak memory = ``ru_maxrss`` of each rank (CPU; whole process, data included) or
  ``torch.cuda.max_memory_allocated`` (GPU), the largest over ranks;
- at world size > 1, bytes of parameters + gradients + optimizer state per rank with
  ``--strategy ddp`` and ``fsdp`` (``common.parallel.memory_per_rank`` after one optimizer step);
- CIFAR only: images/s delivered to the model by the project's path (uint8 tensor cache +
  on-device batch augmentation) and by torchvision's ImageFolder + DataLoader + PIL transforms
  on the same JPEG files, in the same run.

``--tables peer`` (not in the default set: whole training runs, about 15 minutes each on a
2-core CPU) races ``cifar/train.py --preset airbench94`` at each world size against its peer,
``bench/airbench94.py`` (airbench94's published recipe on the same images, one process), per
``--seeds``: time to ``--target-accuracy`` and final accuracy, written to
``<out>/cifar-vs-airbench94.md`` and ``.json`` (``bench/peer.py``):

  python bench/bench.py --data-dir ../shared/data --tables peer --seeds 0,1,2 --out docs/

Modules: ``bench/workloads.py`` (each program's data, model, optimizer, loss), ``timing.py``
(the measuring workers), ``pipeline.py`` (the CIFAR data-path study), ``render.py`` (the
Markdown report); this file parses the command line, launches the workers and writes the files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.launch import child_env, launch_command
from bench.peer import race, render_race
from bench.pipeline import worker_pipeline
from bench.render import _command, render
from bench.timing import DEFAULT_STEPS, DEFAULT_WARMUP, cpu_model, summarize, worker_memory, worker_program
from bench.workloads import WORKLOADS
from common.errors import UserError, run_main
from common.files import write_text_atomic
from common.records import git_commit, write_json_atomic

__all__ = ["main", "render", "summarize"]  # render and summarize: what tests/test_bench.py checks

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("housing", "cifar", "anomaly")
TABLES = ("throughput", "memory", "pipeline")  # the default set, for benchmarks.md
PEER_TABLE = "peer"  # cifar against bench/airbench94.py: cifar-vs-airbench94.md
EXAMPLE = """examples:
  python bench/bench.py --data-dir ../shared/data --out docs/
  python bench/bench.py --data-dir ../shared/data --programs housing --steps 20 --out /tmp/bench
  python bench/bench.py --data-dir data --device cuda --out docs/      # needs 2 GPUs for world size 2
  python bench/bench.py --data-dir ../shared/data --tables peer --seeds 0,1,2 --out docs/
"""


# ---------------------------------------------------------------------------------------------
# Orchestration: launch the workers, collect, write the tables
# ---------------------------------------------------------------------------------------------


def launch(worker_args: list[str], nproc: int, timeout_s: float) -> dict:
    """Run this file as a worker with ``nproc`` processes; return rank 0's JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = launch_command(Path(__file__).resolve(), [*worker_args, "--result", str(result)], nproc)
        try:
            done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(
                f"bench worker {' '.join(worker_args)} (x{nproc}) ran past {timeout_s:.0f} s; use fewer --steps"
            ) from None
        if done.returncode != 0 or not result.is_file():
            lines = (done.stderr + done.stdout).splitlines()
            # The workers' own messages, not torchrun's summary of them.
            causes = [
                ln
                for ln in lines
                if re.match(r"^(\[rank \d+\] )?error: |^\w+(Error|Exception)\b", ln) and "ChildFailedError" not in ln
            ]
            tail = "\n".join(dict.fromkeys(causes)) or "\n".join(lines[-15:])
            raise UserError(
                f"bench worker {' '.join(worker_args)} (x{nproc}) failed with exit code {done.returncode}:\n{tail}"
            )
        return json.loads(result.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] + "\n\n" + EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        help="folder with housing.csv, UNSW_NB15_*.csv(.zip), cifar10-jpg.tar.gz",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for benchmarks.md and benchmarks.json (benchmarks-cuda.* on --device cuda); default: print only",
    )
    parser.add_argument("--programs", default=",".join(PROGRAMS), help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--world-sizes", default="1,2", help="comma-separated process counts")
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="cpu = gloo; cuda = NCCL, one GPU per process"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"timed steps of each kind (default per program: {DEFAULT_STEPS})"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help=f"warm-up steps of each kind (default per program: {DEFAULT_WARMUP})"
    )
    parser.add_argument(
        "--tables",
        default=",".join(TABLES),
        help="which tables: throughput (per program and world size), memory "
        "(ddp vs fsdp at the largest world size), pipeline (cifar data "
        "paths); or peer (cifar --preset airbench94 against bench/"
        "airbench94.py, whole training runs: not in the default set)",
    )
    parser.add_argument("--seeds", default="0", help="peer: comma-separated seeds, one race each")
    parser.add_argument(
        "--target-accuracy", type=float, default=0.90, help="peer: the flip-TTA test accuracy whose time is compared"
    )
    parser.add_argument(
        "--train-per-class",
        type=int,
        default=None,
        metavar="N",
        help="peer, quick trials only: a class-balanced subset of training images",
    )
    parser.add_argument(
        "--test-limit", type=int, default=None, metavar="N", help="peer, quick trials only: the first N test images"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="peer, quick trials only: both systems' global batch instead of "
        "their recipes' (1,024 for the peer, 1,000 for the preset)",
    )
    parser.add_argument(
        "--peer-epochs",
        type=float,
        default=None,
        metavar="E",
        help="peer, quick trials only: the peer's epochs instead of 9.9 (the project trains the next whole number)",
    )
    parser.add_argument(
        "--pipeline-epochs", type=int, default=2, help="timed passes over the comparison images per data path"
    )
    parser.add_argument(
        "--loader-workers",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[0, 2],
        help="DataLoader num_workers values to try (best counts)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per worker launch")
    # Internal: how main() starts the measuring processes.
    parser.add_argument("--worker", choices=["program", "memory", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--program", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    parser.add_argument("--with-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.program_list = [p.strip() for p in args.programs.split(",") if p.strip()]
    unknown = set(args.program_list) - set(WORKLOADS)
    if unknown or not args.program_list:
        raise UserError(
            f"--programs: unknown or empty ({', '.join(sorted(unknown))}); choose from {', '.join(WORKLOADS)}"
        )
    args.table_list = [t.strip() for t in args.tables.split(",") if t.strip()]
    if set(args.table_list) - {*TABLES, PEER_TABLE} or not args.table_list:
        raise UserError(f"--tables {args.tables!r}: choose from {', '.join((*TABLES, PEER_TABLE))}")
    try:
        args.seed_list = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: expected integers like 0,1,2") from None
    if not 0 < args.target_accuracy <= 1:
        raise UserError(f"--target-accuracy must be in (0, 1], got {args.target_accuracy}")
    if args.peer_epochs is not None and args.peer_epochs <= 0:
        raise UserError(f"--peer-epochs must be positive, got {args.peer_epochs}")
    try:
        args.world_size_list = sorted({int(w) for w in args.world_sizes.split(",")})
    except ValueError:
        raise UserError(f"--world-sizes {args.world_sizes!r}: expected integers like 1,2") from None
    if min(args.world_size_list) < 1:
        raise UserError("--world-sizes must be positive")
    for name in ("steps", "warmup"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "steps" else 0):
            raise UserError(f"--{name} must be {'positive' if name == 'steps' else '>= 0'}, got {value}")
    if args.pipeline_epochs < 1 or min(args.loader_workers) < 0:
        raise UserError("--pipeline-epochs must be >= 1 and --loader-workers >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return args


def run_all(args: argparse.Namespace) -> dict:
    """Every (program, world size) launch, the memory table and the data-path comparison."""
    shared = ["--data-dir", str(args.data_dir), "--device", args.device]
    if args.steps is not None:
        shared += ["--steps", str(args.steps)]
    if args.warmup is not None:
        shared += ["--warmup", str(args.warmup)]
    results: dict = {"programs": {}, "memory": {}, "pipeline": None}
    memory_ws = max(args.world_size_list)
    want_memory = "memory" in args.table_list and memory_ws > 1
    for program in args.program_list if "throughput" in args.table_list else []:
        runs = {}
        for ws in args.world_size_list:
            print(f"bench: {program} at world size {ws} ...", file=sys.stderr, flush=True)
            # The largest world size also does the ddp-vs-fsdp memory table (one launch fewer).
            extra = ["--with-memory"] if want_memory and ws == memory_ws else []
            runs[str(ws)] = launch(["--worker", "program", "--program", program, *shared, *extra], ws, args.timeout)
            memory = runs[str(ws)].pop("strategy_memory")
            if memory is not None:
                results["memory"][program] = {
                    "program": program,
                    "describe": runs[str(ws)]["describe"],
                    "world_size": ws,
                    **memory,
                }
        base = runs.get("1")
        for ws, run in runs.items():
            run["scaling_efficiency"] = (
                run["samples_per_s_total"] / (int(ws) * base["samples_per_s_total"]) if base else None
            )
        results["programs"][program] = runs
    for program in [p for p in args.program_list if want_memory and p not in results["memory"]]:
        print(f"bench: {program} ddp vs fsdp memory at world size {memory_ws} ...", file=sys.stderr, flush=True)
        results["memory"][program] = launch(
            ["--worker", "memory", "--program", program, *shared], memory_ws, args.timeout
        )
    if "pipeline" in args.table_list and "cifar" in args.program_list:
        print("bench: cifar data paths ...", file=sys.stderr, flush=True)
        results["pipeline"] = launch(
            [
                "--worker",
                "pipeline",
                *shared,
                "--pipeline-epochs",
                str(args.pipeline_epochs),
                "--loader-workers",
                ",".join(map(str, args.loader_workers)),
            ],
            1,
            args.timeout,
        )
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker == "program":
        return worker_program(args)
    if args.worker == "memory":
        return worker_memory(args)
    if args.worker == "pipeline":
        return worker_pipeline(args)
    if "RANK" in os.environ:
        raise UserError(
            "run bench/bench.py with plain python: it launches torchrun itself for each world size (--world-sizes)"
        )
    argv = list(sys.argv[1:] if argv is None else argv)
    if PEER_TABLE in args.table_list:
        run_peer(args, argv)
    if set(args.table_list) & set(TABLES):
        write_benchmarks(args, argv)


def run_peer(args: argparse.Namespace, argv: list[str]) -> None:
    """The cifar race against bench/airbench94.py: printed, and written to --out."""
    quick = [
        *(["--train-per-class", str(args.train_per_class)] if args.train_per_class else []),
        *(["--test-limit", str(args.test_limit)] if args.test_limit else []),
        *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
    ]
    result = race(
        args.data_dir,
        args.seed_list,
        args.world_size_list,
        args.device,
        args.target_accuracy,
        args.timeout,
        quick,
        args.peer_epochs,
    )
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
    }
    report = {"command": _command(argv), "environment": env, **result}
    text = "\n".join(
        [
            f"# cifar/train.py against airbench94 ({args.device})",
            "",
            f"Generated by `{report['command']}` on {env['date']}: {env['device_name']}, "
            f"{env['cpu_count']} logical CPUs, torch {env['torch_version']}, "
            f"commit {env['git_commit']}.",
            "",
            *render_race(result),
        ]
    )
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "cifar-vs-airbench94" + ("-cuda" if args.device == "cuda" else "")
        write_json_atomic(args.out / f"{stem}.json", report)
        write_text_atomic(args.out / f"{stem}.md", text)
        print(f"wrote {args.out / (stem + '.md')} and {stem}.json", file=sys.stderr)


def write_benchmarks(args: argparse.Namespace, argv: list[str]) -> None:
    """The default tables: benchmarks.md and benchmarks.json (-cuda on a GPU)."""
    results = run_all(args)
    runs = next(iter(results["programs"].values()), {})
    base = ["--data-dir", str(args.data_dir)] + (["--device", "cuda"] if args.device == "cuda" else [])
    ws = ["--world-sizes", args.world_sizes] if args.world_sizes != "1,2" else []
    report = {
        "command": _command(argv),
        "data_dir": str(args.data_dir),
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": args.device,
            "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_model(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "gpu_count": torch.cuda.device_count() if args.device == "cuda" else 0,
            "threads_per_process": ", ".join(f"{r['threads_per_process']} at world size {w}" for w, r in runs.items())
            or "-",
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "git_commit": git_commit(),
        },
        "argv_for": {p: base + ["--programs", p, *ws, "--tables", "throughput"] for p in results["programs"]},
        "argv_memory": base
        + [
            "--programs",
            ",".join(results["memory"]),
            "--world-sizes",
            str(max(args.world_size_list)),
            "--tables",
            "memory",
        ],
        "argv_pipeline": base + ["--programs", "cifar", "--tables", "pipeline"],
        "results": results,
    }
    stem = "benchmarks-cuda" if args.device == "cuda" else "benchmarks"
    if args.out is not None and args.device != "cuda" and (args.out / "benchmarks-cuda.md").is_file():
        report["cuda_report"] = "benchmarks-cuda.md"
    text = render(report)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / f"{stem}.json", report)
        write_text_atomic(args.out / f"{stem}.md", text)
        print(f"wrote {args.out / (stem + '.md')} and {stem}.json", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
