"""What every command shares: global options, the error policy, progress and JSON output."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

import typer

from uvq.progress import Reporter
from uvq.stopping import StopRequest


@dataclass
class GlobalState:
    """Options given before the subcommand (`uvq --debug --json fit-vqgan ...`)."""

    debug: bool = False
    json: bool = False
    argv: list[str] = field(default_factory=lambda: list(sys.argv))
    # The command's stop request: the CLI's signal handlers set it, long loops read it (uvq.stopping).
    stop: StopRequest = field(default_factory=StopRequest)

    def reset(self, argv: list[str], debug: bool = False) -> None:
        """Start a command afresh: `uvq.cli.app.main` may run many in one process (the tests do)."""
        self.argv, self.debug, self.json = list(argv), debug, False
        self.stop = StopRequest()


STATE = GlobalState()

# Shared option declarations, so that every command spells them the same way.
OutOpt = typer.Option(..., "--out", "-o", help="Output directory.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
# Every --seed makes a run reproducible; where a recipe is the command's input, it defaults to the
# recipe's run.seed, elsewhere the command's own option says its default (0).
SeedOpt = typer.Option(None, "--seed", help="Random seed (default: the recipe's run.seed).")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace the contents of a non-empty output directory.")
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON summary on stdout; progress as JSON lines on stderr.")
DebugOpt = typer.Option(False, "--debug", help="Show tracebacks for errors.")
# The long commands' stopping and resuming (docs/reliability.md, "Signals and time limits").
TimeLimitOpt = typer.Option(None, "--time-limit", help="Stop (state saved, exit 75) run.stop_margin_s before this "
                            "long after the start: seconds or HH:MM:SS / D-HH:MM:SS (sets run.time_limit).")
ResumeOpt = typer.Option(None, "--resume", metavar="[auto]",
                         help="Continue the run in --out from its last checkpoint; `--resume auto` continues "
                              "when --out holds a run and starts one otherwise (one line for a job and its requeues).")
# Where the sampling commands (sample, upscale-canvas, inpaint) take their models from.
PriorOpt = typer.Option(None, "--prior", help="Prior checkpoint or run directory (default: from --run-dir, "
                        "--recipe or the current directory).")
PriorRunOpt = typer.Option(None, "--run-dir", help="A pipeline or fit-prior run directory to take the prior from.")
PriorRecipeOpt = typer.Option(None, "--recipe", help="Recipe (YAML path or packaged name) whose pipeline run "
                              "(runs/<name>) holds the prior.")
VqganOpt = typer.Option(None, "--vqgan", help="VQGAN checkpoint (default: the one in the prior's provenance).")


def apply_local(json_flag: bool = False, debug_flag: bool = False) -> None:
    """Options may also be given after the subcommand; either place works."""
    STATE.json = STATE.json or json_flag
    STATE.debug = STATE.debug or debug_flag


def time_limit_override(time_limit: str | None) -> list[str]:
    """`--time-limit X` as the recipe override it stands for."""
    return [] if time_limit is None else [f"run.time_limit={time_limit}"]


def reporter() -> Reporter:
    return Reporter("json" if STATE.json else None)


def emit(summary: dict[str, Any], human: str | None = None) -> None:
    """The result of a command: JSON on stdout with --json, else a human line on stdout."""
    if STATE.json:
        print(json.dumps(summary, default=str), flush=True)
    elif human:
        typer.echo(human)


# `uvq eval ...`: one group that several command modules add metrics to.
eval_app = typer.Typer(help="Evaluate samples, reconstructions and likelihoods.", no_args_is_help=True)
