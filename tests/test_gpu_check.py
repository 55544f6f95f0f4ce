"""scripts/gpu_check.sh, the GPU acceptance run, dry-run on the CPU so it cannot rot.

Every command the GPU check runs (3 programs x plain / torchrun / fsdp, then the benchmark) runs
here on tiny synthetic data with ``--device cpu --quick``; the table and the report must list
every row as passing. The real figures come from a GPU (docs/gpu.md).
"""
from __future__ import annotations

import subprocess

from anomaly.data import TRAIN_FILE
from anomaly.synthetic import make_partition, write_partition
from tests.launch import REPO, child_env
from tests.test_cifar import make_folders
from tests.test_housing import synthetic_frame


def test_gpu_check_dry_run_on_cpu(tmp_path):
    data = tmp_path / "data"
    make_folders(data)  # cifar class folders {train,test}/<class>/ beside the other files
    synthetic_frame().to_csv(data / "housing.csv", index=False)
    write_partition(make_partition(600, seed=1), data / TRAIN_FILE)
    report = tmp_path / "gpu.md"
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(data), "--device", "cpu", "--quick",
         "--runs", str(tmp_path / "runs"), "--report", str(report), "--timeout", "120"],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = report.read_text()
    assert "CPU (dry run)" in text and "torch " in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows] == [
        (program, mode) for program in ("housing", "anomaly", "cifar")
        for mode in ("plain", "torchrun", "fsdp")] + [("bench", "ws1")]
    assert all("| pass" in row for row in rows), text
    # The table is the last thing printed, as a person reading the terminal expects.
    assert result.stdout.rstrip().splitlines()[-2].startswith("| bench | ws1 |")
