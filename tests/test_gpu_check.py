"""scripts/gpu_check.sh, the GPU acceptance run, dry-run on the CPU so it cannot rot.

Every command the GPU check runs (3 programs x plain / torchrun / fsdp, then the benchmark) runs
here on tiny synthetic data with ``--device cpu --quick``; the table and the report must list
every row as passing. The real figures come from a GPU (docs/gpu.md).

The check runs in this process with tests/forkrun.py as its runner: each command line it builds
is run end to end, its torchrun options read by torchrun's own parser, with the ranks forked
instead of ten fresh interpreters (about 100 CPU-seconds of start-up on the 2-core CI machine).
"""
from __future__ import annotations

import subprocess

from anomaly.data import TRAIN_FILE
from anomaly.synthetic import make_partition, write_partition
from bench import gpu_check
from tests.forkrun import fork_command
from tests.launch import REPO, child_env
from tests.test_cifar import make_folders
from tests.test_housing import synthetic_frame


def test_gpu_check_dry_run_on_cpu(tmp_path, capsys):
    data = tmp_path / "data"
    make_folders(data)  # cifar class folders {train,test}/<class>/ beside the other files
    synthetic_frame().to_csv(data / "housing.csv", index=False)
    write_partition(make_partition(600, seed=1), data / TRAIN_FILE)
    report = tmp_path / "gpu.md"
    commands = []

    def run(cmd, **kwargs):
        commands.append(cmd)
        return fork_command(cmd, **kwargs)

    code = gpu_check.main([str(data), "--device", "cpu", "--quick", "--runs", str(tmp_path / "runs"),
                           "--report", str(report), "--timeout", "120"], run=run)
    stdout = capsys.readouterr().out
    assert code == 0, stdout + "".join(p.read_text()[-2000:] for p in (tmp_path / "runs").glob("*.log"))
    text = report.read_text()
    assert "CPU (dry run)" in text and "torch " in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows] == [
        (program, mode) for program in ("housing", "anomaly", "cifar")
        for mode in ("plain", "torchrun", "fsdp")] + [("bench", "ws1")]
    assert all("| pass" in row for row in rows), text
    # The table is the last thing printed, as a person reading the terminal expects.
    assert stdout.rstrip().splitlines()[-2].startswith("| bench | ws1 |")
    # The launch modes are the commands a GPU box runs: torchrun (one process) for two of three.
    assert sum("torch.distributed.run" in cmd for cmd in commands) == 6
    assert sum("fsdp" in cmd for cmd in commands) == 3


def test_gpu_check_script_is_the_python_check():
    """The shell entry point: its usage text, and that it hands every argument to bench/gpu_check.py."""
    usage = subprocess.run(["bash", "scripts/gpu_check.sh", "--help"], cwd=REPO, env=child_env(),
                           capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and "gpu_check.sh DATA_DIR" in usage.stdout
    assert 'exec python "$REPO/bench/gpu_check.py" "$@"' in (REPO / "scripts" / "gpu_check.sh").read_text()
