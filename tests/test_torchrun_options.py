"""Every uvq option passes through `torchrun ... -m uvq CMD ...` as typed (docs/cluster.md).

torchrun's argument parser (argparse, with abbreviations allowed) matches a prefix of one of its
own long options anywhere on the line, even after `-m uvq`: `--n` was refused as ambiguous
(`--nnodes`, `--nproc-per-node`, ...) and `--run` taken for `--run-path`. This test walks every
command of the real Typer app and hands each option to torchrun's real parser.
"""

from __future__ import annotations

import pytest
import typer

from uvq.cli.app import app


def _options(command, path, ctx=None):
    if hasattr(command, "list_commands"):  # a group: walk its subcommands (loaded on demand)
        ctx = ctx or command.make_context("uvq", [], resilient_parsing=True)
        for name in command.list_commands(ctx):
            yield from _options(command.get_command(ctx, name), [*path, name], ctx)
    for param in command.params:
        for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]:
            if opt.startswith("-"):
                yield path, opt


def _all_options():
    return sorted({(" ".join(p), o) for p, o in _options(typer.main.get_command(app), [])})


def test_the_walk_sees_every_command():
    commands = {c for c, _ in _all_options()}
    for name in ("fit-vqgan", "encode", "fit-prior", "sample", "upscale-canvas", "inpaint", "pipeline",
                 "eval fid", "eval elbo", "neighbours", "import official", "import taming"):
        assert name in commands, name
    assert ("sample", "-n") in _all_options() and ("sample", "--count") in _all_options()


@pytest.mark.parametrize("command,option", _all_options())
def test_option_passes_through_torchrun(command, option):
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    own = {s for action in parser._actions for s in action.option_strings}
    clashes = sorted(s for s in own if s.startswith(option))
    assert not clashes, f"uvq {command} {option} is a prefix of torchrun's {clashes}: rename it"
    argv = ["--nproc-per-node", "2", "-m", "uvq", *command.split(), option, "1"]
    args = parser.parse_args(argv)
    assert args.nproc_per_node == "2" and args.module
    assert args.training_script == "uvq" and args.training_script_args == [*command.split(), option, "1"]
