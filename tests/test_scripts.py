"""Launch scripts: the recipes in the README, run for real. (Two torchrun "nodes" on this machine
train housing in tests/test_faults.py, and end where one node does.)"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.launch import REPO, child_env

SCRIPTS = REPO / "scripts"


def _script(*argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *argv], cwd=REPO, env=child_env(env), capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "argv,env,expected",
    [
        (
            ["scripts/run_single_node.sh", "--dry-run", "tests/toy_train.py", "--epochs", "1"],
            {},
            "torchrun --standalone --nproc_per_node=gpu tests/toy_train.py --epochs 1",
        ),
        (
            ["scripts/run_multi_node.sh", "--dry-run", "tests/toy_train.py", "--lr", "0.1"],
            {"NNODES": "2", "RDZV_ENDPOINT": "node0:29500", "NPROC": "4", "RDZV_ID": "job7"},
            "torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 "
            "--rdzv-id=job7 tests/toy_train.py --lr 0.1",
        ),
        # A node with several networks: its own address, and the interface gloo/NCCL use.
        (
            ["scripts/run_multi_node.sh", "--dry-run", "tests/toy_train.py"],
            {
                "NNODES": "2",
                "RDZV_ENDPOINT": "10.1.0.1:29500",
                "NPROC": "1",
                "NODE_ADDR": "10.1.0.2",
                "NET_IF": "ib0",
                "MAX_RESTARTS": "1",
            },
            "env GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0 torchrun --nnodes=2 --nproc_per_node=1 "
            "--rdzv-backend=c10d --rdzv-endpoint=10.1.0.1:29500 --rdzv-id=torchdist-job --local-addr=10.1.0.2 "
            "--max-restarts=1 tests/toy_train.py",
        ),
        (
            ["scripts/slurm.sbatch", "tests/toy_train.py", "--epochs", "2"],
            {"DRY_RUN": "1", "SLURM_NNODES": "3", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": "42"},
            "srun --kill-on-bad-exit=1 python -m torch.distributed.run --nnodes=3 --nproc_per_node=8 "
            "--rdzv-backend=c10d --rdzv-endpoint=localhost:29500 --rdzv-id=42 --max-restarts=3 "
            r"--signals-to-handle=SIGTERM\,SIGINT\,SIGHUP\,SIGQUIT\,SIGUSR1 tests/toy_train.py --resume --epochs 2",
        ),
        # CPU-only nodes: no GPUs from SLURM, so NPROC CPU workers (default 1) per node.
        (
            ["scripts/slurm.sbatch", "housing"],
            {"DRY_RUN": "1", "SLURM_NNODES": "2", "SLURM_JOB_ID": "7", "RDZV_HOST": "10.1.0.1", "NPROC": "2"},
            f"srun --kill-on-bad-exit=1 python -m torch.distributed.run --nnodes=2 --nproc_per_node=2 "
            f"--rdzv-backend=c10d --rdzv-endpoint=10.1.0.1:29500 --rdzv-id=7 --max-restarts=3 "
            r"--signals-to-handle=SIGTERM\,SIGINT\,SIGHUP\,SIGQUIT\,SIGUSR1 "
            f"{REPO}/housing/train.py --resume",
        ),
    ],
)
def test_dry_run_prints_the_exact_command(argv, env, expected):
    result = _script(*argv, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "+ " + expected


def test_slurm_script_finds_each_nodes_address_on_the_given_interface():
    """NET_IF: srun runs a bash on every node that looks up that node's address on NET_IF."""
    result = _script(
        "scripts/slurm.sbatch", "tests/toy_train.py", env={"DRY_RUN": "1", "NET_IF": "lo", "PYTHON": "echo"}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "+ srun --kill-on-bad-exit=1 env GLOO_SOCKET_IFNAME=lo NCCL_SOCKET_IFNAME=lo bash -c "
    )
    # The same command without srun, with echo for python: it prints what torchrun would get.
    launched = subprocess.run(
        ["bash", "-c", result.stdout[len("+ srun --kill-on-bad-exit=1 ") :]], capture_output=True, text=True, cwd=REPO
    )
    assert launched.stdout.startswith("-m torch.distributed.run --local-addr=127.0.0.1 --nnodes=2 ")


def test_multi_node_script_needs_its_variables():
    result = _script("scripts/run_multi_node.sh", "--dry-run", "tests/toy_train.py")
    assert result.returncode != 0 and "NNODES" in result.stderr


def test_cpu_script_runs_end_to_end(tmp_path):
    result = _script(
        "scripts/run_cpu.sh", "tests/toy_train.py", "--out-dir", str(tmp_path), "--epochs", "1", env={"NPROC": "2"}
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 2


def test_get_data_finds_what_is_there_and_explains_what_is_not(tmp_path):
    from tests.small_data import synthetic_frame

    synthetic_frame(20).to_csv(tmp_path / "housing.csv", index=False)
    result = _script("scripts/get_data.sh", str(tmp_path), env={})
    assert result.returncode != 0  # no CIFAR-10 and no network here: it says so and stops
    assert f"housing: {tmp_path}/housing.csv" in result.stdout
    assert "no CIFAR-10 there and the download" in result.stderr or "cifar" in result.stderr.lower()
