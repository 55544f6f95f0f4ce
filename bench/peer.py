"""cifar/train.py --preset airbench94 against its peer, bench/airbench94.py, side by side.

For each seed: the peer (one process, every core), then ``cifar/train.py --preset airbench94``
at each world size (torchrun; the cores split between the processes), on the same decoded images
and device, one after the other so they see the same machine. Each reports the seconds it timed
up to the first evaluation at or above the target accuracy (flip TTA; both time the whitening,
the training steps and that evaluation, not data loading) and its final flip-TTA accuracy.
The ratio column divides the project's time to the target by the peer's of the same seed: at
most 1.0 means the project is at least as fast.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.launch import child_env, launch_command
from common.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PEER = REPO / "bench" / "airbench94.py"
PROGRAM = REPO / "cifar" / "train.py"


def _run(cmd: list[str], what: str, timeout_s: float) -> None:
    try:
        done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise UserError(f"{what} ran past {timeout_s:.0f} s (--timeout)") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr + done.stdout).splitlines()[-12:])
        raise UserError(f"{what} failed with exit code {done.returncode}:\n{tail}")


def race(
    data_dir: Path,
    seeds: list[int],
    world_sizes: list[int],
    device: str,
    target: float,
    timeout_s: float,
    quick: list[str] = (),
    peer_epochs: float | None = None,
) -> dict:
    """Every run's figures: the peer and the project at each world size, for each seed.

    ``quick`` (options both programs take, e.g. ``--train-per-class 103 --test-limit 200`` or
    ``--batch-size 12``) and ``peer_epochs`` (the project then trains the next whole number of
    epochs) only make a short trial run.
    """
    rows = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "peer.json"
            print(f"bench: airbench94 peer, seed {seed} ...", file=sys.stderr, flush=True)
            _run(
                [
                    sys.executable,
                    str(PEER),
                    "--data-dir",
                    str(data_dir),
                    "--seed",
                    str(seed),
                    "--device",
                    device,
                    "--target-accuracy",
                    str(target),
                    "--out",
                    str(out),
                    *quick,
                    *(["--epochs", str(peer_epochs)] if peer_epochs else []),
                ],
                f"bench/airbench94.py (seed {seed})",
                timeout_s,
            )
            peer = json.loads(out.read_text())
            rows.append(
                {
                    "system": "airbench94 peer",
                    "processes": 1,
                    "seed": seed,
                    "epochs": peer["epochs"],
                    "time_to_target_s": peer["time_to_target_s"],
                    "test_accuracy_flip_tta": peer["test_accuracy_flip_tta"],
                    "test_accuracy_flip_translate_tta": peer["test_accuracy_flip_translate_tta"],
                    "timed_s": peer["timed_s"],
                    "wall_time_s": peer["wall_time_s"],
                }
            )
            for ws in world_sizes:
                run_dir = Path(tmp) / f"cifar-{ws}"
                print(
                    f"bench: cifar/train.py --preset airbench94, {ws} process(es), seed {seed} ...",
                    file=sys.stderr,
                    flush=True,
                )
                args = [
                    "--data-dir",
                    str(data_dir),
                    "--out-dir",
                    str(run_dir),
                    "--preset",
                    "airbench94",
                    "--device",
                    device,
                    "--seed",
                    str(seed),
                    "--target-accuracy",
                    str(target),
                    *quick,
                    *(["--epochs", str(math.ceil(peer_epochs))] if peer_epochs else []),
                ]
                _run(launch_command(PROGRAM, args, ws), f"cifar/train.py ({ws} processes, seed {seed})", timeout_s)
                summary = json.loads((run_dir / "summary.json").read_text())
                rows.append(
                    {
                        "system": "cifar/train.py --preset airbench94",
                        "processes": ws,
                        "seed": seed,
                        "epochs": summary["config"]["epochs"],
                        "time_to_target_s": summary["time_to_target_s"],
                        "test_accuracy_flip_tta": summary["test_accuracy"],
                        "test_accuracy_flip_translate_tta": None,
                        "timed_s": summary["timed_s"],
                        "wall_time_s": summary["wall_time_s"],
                    }
                )
    for row in rows:
        peer = next(r for r in rows if r["seed"] == row["seed"] and r["system"] == "airbench94 peer")
        both = row["time_to_target_s"] is not None and peer["time_to_target_s"] is not None
        row["ratio_to_peer"] = row["time_to_target_s"] / peer["time_to_target_s"] if both else None
    return {"target_accuracy": target, "seeds": seeds, "world_sizes": world_sizes, "rows": rows}


def _mean(values: list) -> tuple[float | None, float | None]:
    """Mean and standard deviation of the values, or None when any is missing."""
    if not values or any(v is None for v in values):
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_race(result: dict) -> list[str]:
    """The Markdown section: one line per run, then per system the mean over seeds."""
    target = result["target_accuracy"]
    lines = [
        "## cifar against the airbench94 peer",
        "",
        __doc__.split("\n\n", 1)[1].strip(),
        "",
        f"| system | processes | seed | epochs | time to {target:.0%} (s) | ratio to peer | "
        "final accuracy, flip TTA | flip + translate TTA | timed (s) | wall (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['system']} | {r['processes']} | {r['seed']} | {r['epochs']:g} | "
            f"{_fmt(r['time_to_target_s'], '.1f')} | {_fmt(r['ratio_to_peer'], '.3f')} | "
            f"{r['test_accuracy_flip_tta']:.2%} | {_fmt(r['test_accuracy_flip_translate_tta'], '.2%')} | "
            f"{r['timed_s']:.1f} | {r['wall_time_s']:.1f} |"
        )
    lines += [
        "",
        f"Mean over seeds {', '.join(map(str, result['seeds']))} (standard deviation):",
        "",
        f"| system | processes | time to {target:.0%} (s) | ratio to peer | final accuracy, flip TTA |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    systems = dict.fromkeys((r["system"], r["processes"]) for r in result["rows"])
    for system, processes in systems:
        mine = [r for r in result["rows"] if (r["system"], r["processes"]) == (system, processes)]
        (t, t_sd), (q, _), (a, a_sd) = (
            _mean([r[k] for r in mine]) for k in ("time_to_target_s", "ratio_to_peer", "test_accuracy_flip_tta")
        )
        lines.append(
            f"| {system} | {processes} | {_fmt(t, '.1f')} ({_fmt(t_sd, '.1f')}) | "
            f"{_fmt(q, '.3f')} | {a:.2%} ({a_sd:.2%}) |"
        )
    return lines + [""]
