"""scripts/gpu_check.sh, the GPU acceptance run, dry-run on the CPU so it cannot rot.

Every command the GPU check runs (3 programs x plain / torchrun / fsdp / eval-only, a killed and
pre-empted housing job, a pre-empted cifar job, anomaly/predict.py, then the benchmark) runs here
on tiny synthetic data with ``--device cpu --quick``; the table and the report must list every
row as passing. The real figures come from a GPU (docs/gpu.md).

The check runs in this process with tests/forkrun.py as its runner: each command line it builds
is run end to end, its torchrun options read by torchrun's own parser, with the ranks forked
instead of fresh interpreters (about 100 CPU-seconds of start-up on the 2-core CI machine). The
two interrupted jobs launch real torchrun: its restart is what they check.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from anomaly.data import TRAIN_FILE
from anomaly.synthetic import make_partition, write_partition
from bench import gpu_check
from tests.forkrun import fork_command
from tests.launch import REPO, child_env
from tests.small_data import make_folders, write_housing


def test_gpu_check_dry_run_on_cpu(tmp_path, capsys):
    data = tmp_path / "data"
    make_folders(data)  # cifar class folders {train,test}/<class>/ beside the other files
    write_housing(data)
    write_partition(make_partition(600, seed=1), data / TRAIN_FILE)
    report = tmp_path / "gpu.md"
    commands = []

    def run(cmd, **kwargs):
        commands.append(cmd)
        return fork_command(cmd, **kwargs)

    code = gpu_check.main(
        [
            str(data),
            "--device",
            "cpu",
            "--quick",
            "--runs",
            str(tmp_path / "runs"),
            "--report",
            str(report),
            "--timeout",
            "120",
        ],
        run=run,
    )
    stdout = capsys.readouterr().out
    assert code == 0, stdout + "".join(p.read_text()[-2000:] for p in (tmp_path / "runs").glob("*.log"))
    text = report.read_text()
    assert "CPU (dry run)" in text and "torch " in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows] == [
        (program, mode)
        for program, extra in (("housing", "kill+term"), ("anomaly", "predict"), ("cifar", "term"))
        for mode in ("plain", "torchrun", "fsdp", "eval-only", extra)
    ] + [("cifar", "peer"), ("bench", "ws1")]
    assert all("| pass" in row for row in rows), text
    for row in rows[3], rows[4], rows[8], rows[13], rows[14]:  # the torchrun row's metric again
        assert "the torchrun row's metric" in row, row
    assert "resumed" in rows[4] and "resumed" in rows[14]
    assert "x the airbench94 peer's" in rows[15], rows[15]
    # The table is the last thing printed, as a person reading the terminal expects.
    assert stdout.rstrip().splitlines()[-2].startswith("| bench | ws1 |")
    # The launch modes are the commands a GPU box runs: torchrun (one process) for the torchrun,
    # fsdp and eval-only rows and the two resumes after an interruption.
    assert sum("torch.distributed.run" in cmd for cmd in commands) == 11
    assert sum("fsdp" in cmd for cmd in commands) == 3


def test_a_command_past_its_time_is_killed_with_what_it_started(tmp_path):
    """A hung row (torchrun's agent and its workers) is killed whole after --timeout."""
    pid_file = tmp_path / "child.pid"
    script = (
        f"import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
        f"'import time; time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); "
        f"time.sleep(60)"
    )
    started = time.time()
    with pytest.raises(subprocess.TimeoutExpired):
        gpu_check.run_in_group([sys.executable, "-c", script], cwd=tmp_path, env=child_env(), timeout=3)
    assert time.time() - started < 15
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")
    time.sleep(0.2)  # killed: gone, or a zombie until whoever adopted it reaps it
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_gpu_check_script_is_the_python_check():
    """The shell entry point: its usage text, and that it hands every argument to bench/gpu_check.py."""
    usage = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--help"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert usage.returncode == 0 and "gpu_check.sh DATA_DIR" in usage.stdout
    assert 'exec python "$REPO/bench/gpu_check.py" "$@"' in (REPO / "scripts" / "gpu_check.sh").read_text()
