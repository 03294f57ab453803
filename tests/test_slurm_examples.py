"""The SLURM job files under examples/slurm/ work as written (docs/cluster.md).

Each file is checked three ways: bash accepts its syntax; every uvq command and option it uses
exists in the real Typer app; and its torchrun line, parsed by torchrun's own parser, hands the
uvq part through unchanged.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer

from uvq.cli.app import app

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted((REPO / "examples" / "slurm").glob("*.sbatch"))


def _logical_lines(text: str) -> list[str]:
    """The script's lines with `\\` continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _launches(text: str) -> list[tuple[list[str], list[str]]]:
    """(torchrun arguments, uvq arguments) for every uvq run in a job file.

    A file either calls torchrun inline or through a `launch` shell function whose body is the
    torchrun line; `launch CMD ...` then runs `torchrun ... -m uvq CMD ...`.
    """
    runs, launcher = [], None
    for line in _logical_lines(text):
        words = shlex.split(line)
        if "torchrun" in words and "-m" in words:
            start, module = words.index("torchrun"), words.index("-m")
            torchrun_args, rest = words[start + 1:module], words[module + 2:]
            if rest == ["$@"]:
                launcher = torchrun_args
            else:
                runs.append((torchrun_args, [w for w in rest if w not in (";",)]))
        elif words and words[0] == "launch":
            assert launcher is not None, f"`launch` used before it is defined: {line}"
            runs.append((launcher, words[1:]))
    return runs


def _command(words: list[str]):
    """Resolve `eval fid --samples ...` to the click command and the remaining words."""
    command = typer.main.get_command(app)
    ctx = command.make_context("uvq", [], resilient_parsing=True)
    path = []
    while hasattr(command, "list_commands") and words and words[0] in command.list_commands(ctx):
        path.append(words[0])
        command, words = command.get_command(ctx, words[0]), words[1:]
    assert not hasattr(command, "list_commands"), f"`uvq {' '.join(path)}` is a group, not a command"
    return " ".join(path), command, words


def test_there_are_job_files():
    names = {p.name for p in JOBS}
    assert {"fit-prior-1node.sbatch", "fit-prior-multinode.sbatch"} <= names


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_bash_accepts_the_job_file(job):
    result = subprocess.run(["bash", "-n", str(job)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_every_uvq_command_and_option_exists(job):
    runs = _launches(job.read_text())
    assert runs, f"{job.name} runs no uvq command"
    for _, words in runs:
        path, command, rest = _command(words)
        known = {o for p in command.params for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}
        for word in rest:
            if word.startswith("-"):
                assert word.split("=")[0] in known, f"{job.name}: `uvq {path}` has no option {word}"


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_torchrun_passes_the_uvq_line_through(job):
    from torch.distributed.run import get_args_parser

    for torchrun_args, words in _launches(job.read_text()):
        concrete = [re.sub(r"\$\{?\w+\}?", "1", w) for w in torchrun_args]  # shell variables -> a value
        args = get_args_parser().parse_args([*concrete, "-m", "uvq", *words])
        assert args.module and args.training_script == "uvq"
        assert args.training_script_args == words
        assert "SIGUSR1" in args.signals_to_handle, "torchrun must pass SLURM's SIGUSR1 on to uvq"


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_requeue_rule_is_the_documented_one(job):
    text = job.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=USR1@" in text
    assert re.search(r'"\$rc" -eq 75 \] \|\| \[ -e "\$\w+/\.uvq\.requeue" \]', text), "requeue on 75 or the marker"
    assert "scontrol requeue \"$SLURM_JOB_ID\"" in text
