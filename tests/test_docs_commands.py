"""Every command the docs show parses: READMEs, docs/, the scripts' usage text, --help examples.

A command is followed the way a user's shell would: environment assignments are kept, a launch
script is run with ``--dry-run`` (``DRY_RUN=1`` for the sbatch file) and the command it prints is
followed in turn, torchrun's own options go through torchrun's parser, and the program's
arguments through the program's ``parse_args`` (with its validation), in-process. A flag or a
preset that does not exist fails here, not on a user's GPU box.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from common.errors import UserError
from tests.launch import REPO, child_env

# Program path -> module whose parse_args(argv) checks its arguments.
PROGRAMS = {
    "housing/train.py": "housing.train",
    "housing/tune.py": "housing.tune",
    "housing/features.py": "housing.features",
    "cifar/train.py": "cifar.train",
    "cifar/augment_study.py": "cifar.augment_study",
    "anomaly/train.py": "anomaly.train",
    "anomaly/compare.py": "anomaly.compare",
    "anomaly/explore.py": "anomaly.explore",
    "anomaly/predict.py": "anomaly.predict",
    "bench/bench.py": "bench.bench",
    "bench/airbench94.py": "bench.airbench94",
}
DOCS = [REPO / "README.md", *sorted(REPO.glob("*/README.md")), *sorted((REPO / "docs").glob("*.md"))]
SOURCES = [*(REPO / p for p in PROGRAMS), *sorted((REPO / "scripts").glob("*"))]
LAUNCHERS = ("torchrun", "python", "sbatch", "bash", "srun")
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def _commands_in_markdown(path: Path) -> list[str]:
    """Lines of fenced code blocks and inline code spans that start a program or a script."""
    text = path.read_text()
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        found += block.replace("\\\n", " ").splitlines()
    found += re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
    return found


def _commands_in_source(path: Path) -> list[str]:
    """Example commands in a program's --help text or a script's usage comment."""
    found = []
    for line in re.sub(r"\\+\n", " ", path.read_text()).splitlines():
        line = re.sub(r"^\s*#\s*(Example:|example:)?", "", line).strip()
        found.append(line)
    return found


def _is_command(line: str) -> bool:
    """A runnable command: not a usage synopsis ("PROGRAM [args...]"), not a file listing."""
    words = [w for w in line.split() if not ASSIGNMENT.match(w)]
    if not words or re.search(r"\[|PROGRAM|\$\{", line):
        return False
    if words[0].startswith("scripts/"):
        return (REPO / words[0]).is_file() and words[0] != "scripts/get_data.sh"  # own test
    return words[0] in LAUNCHERS and (any(p in line for p in PROGRAMS) or "scripts/" in line)


def all_commands() -> list[tuple[str, str]]:
    """(where, command) for every command the docs and usage texts show."""
    out = []
    for path in DOCS:
        out += [(path.relative_to(REPO).as_posix(), c) for c in _commands_in_markdown(path)]
    for path in SOURCES:
        out += [(path.relative_to(REPO).as_posix(), c) for c in _commands_in_source(path)]
    seen, unique = set(), []
    for where, command in out:
        command = command.split("  #")[0].split(" # ")[0].strip()
        command = re.sub(r"\s+\.\.\.$", "", command)  # "..." = the user's further arguments
        if _is_command(command) and command not in seen:
            seen.add(command)
            unique.append((where, command))
    return unique


def _placeholders(words: list[str], tmp: Path) -> list[str]:
    # DATA, node names and the like are the user's to fill in; the data folder need not exist
    # for parsing, but --out-dir must be writable (checked by parse_args), so point it here.
    return [str(tmp / "out") if i and words[i - 1] == "--out-dir" else w for i, w in enumerate(words)]


def follow(command: str, tmp: Path) -> tuple[str, list[str]]:
    """The program a command ends up running and its arguments, parsed on the way."""
    words = shlex.split(command)
    env = {}
    while words and ASSIGNMENT.match(words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[0] == "sbatch":
        words = words[1:]
        while words[0].startswith("-"):
            words.pop(0)
        env["DRY_RUN"] = "1"
    if words[0] == "bash":
        words = words[1:]
    if words[0] == "scripts/gpu_check.sh":
        return words[0], words[1:]  # it runs for real (tests/test_gpu_check.py)
    if words[0].startswith("scripts/"):
        dry = [] if words[0].endswith(".sbatch") else ["--dry-run"]
        result = subprocess.run(
            ["bash", words[0], *dry, *words[1:]],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=child_env({**env, "DRY_RUN": env.get("DRY_RUN", "1")}),
            timeout=60,
        )
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        printed = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
        assert printed, f"{command}: printed no command\n{result.stdout}"
        return follow(printed[-1][2:], tmp)
    if words[0] == "srun":
        words = words[1:]
        while words[0].startswith("-"):
            words.pop(0)
    if words[0] == "env":  # env GLOO_SOCKET_IFNAME=... torchrun ...
        words = words[1:]
        while ASSIGNMENT.match(words[0]):
            words.pop(0)
    if words[:2] == ["bash", "-c"] and "-m torch.distributed.run --local-addr=" in words[2]:
        # slurm.sbatch with NET_IF: a bash on each node runs `$0 -m torch.distributed.run
        # --local-addr=<its address> "$@"`, $0 being the python
        words = [words[3], "-m", "torch.distributed.run", "--local-addr=10.0.0.2", *words[4:]]
    if words[0] == "python" and words[1:3] == ["-m", "torch.distributed.run"]:
        words = ["torchrun", *words[3:]]
    if words[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        script_at = next(i for i, w in enumerate(words) if w.endswith(".py"))
        get_args_parser().parse_args(words[1 : script_at + 1])  # torchrun's own options
        words = ["python", *words[script_at:]]
    assert words[0] == "python", command
    script = Path(words[1])
    if script.is_absolute():
        script = script.relative_to(REPO)
    return script.as_posix(), _placeholders(words[2:], tmp)


COMMANDS = all_commands()


def test_the_docs_show_commands_of_every_kind():
    shown = " ".join(c for _, c in COMMANDS)
    for piece in (
        "torchrun",
        "scripts/run_cpu.sh",
        "scripts/run_single_node.sh",
        "scripts/run_multi_node.sh",
        "scripts/slurm.sbatch",
        "scripts/gpu_check.sh",
        *PROGRAMS,
    ):
        assert piece in shown, piece


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w}: {c[:60]}" for w, c in COMMANDS])
def test_shown_command_parses(where, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative --out-dir defaults land in a writable scratch folder
    script, args = follow(command, tmp_path)
    if script.startswith("tests/") or script == "scripts/gpu_check.sh":
        return
    assert script in PROGRAMS, f"{where}: {command} runs {script}, which no test knows"
    module = importlib.import_module(PROGRAMS[script])
    try:
        parsed = module.parse_args(args)
        if script == "cifar/augment_study.py":  # the arguments after -- go to every cifar run
            importlib.import_module("cifar.train").parse_args(parsed[1])
    except SystemExit as exit:  # argparse: an unknown flag or choice
        pytest.fail(f"{where}: `{command}` does not parse (exit {exit.code})")
    except UserError as err:
        if "no CUDA device is available" not in str(err):  # this machine's, not the command's
            raise
