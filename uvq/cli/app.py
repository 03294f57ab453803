"""The `uvq` command: a Typer app whose subcommands are thin wrappers over library functions.

Error policy: a `UserError` (or a bad flag) prints one line `error: ...` on stderr and exits
2; any other exception prints one line and exits 1. `--debug` shows the traceback instead.
An interruption never exits 0. While a long command's loop runs (uvq.stopping), a first
SIGTERM, SIGUSR1 or SIGINT asks it to stop after the current step: it saves its state and the
command exits 75 (uvq.errors.EXIT_REQUEUE, "requeue me"), as it does at `run.time_limit`.
Otherwise, and at a second signal, the command stops at once: SIGINT (Ctrl-C) exits 130, SIGTERM
143 and SIGUSR1 138 (128 + the signal's number, the shell's convention), after one line saying
what was kept and how to go on.

Start-up cost: this module and the command modules import neither torch nor numpy; each command
imports the library it wraps inside its function, so `uvq --help`, `uvq --version` and a mistyped
command answer at once (benchmarks/bench_cli_start.py measures it).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time

import typer

from uvq import __version__

try:  # typer >= 0.2x vendors click and exposes its exception base here
    from typer import TyperException as _CliError
except ImportError:  # older typer re-uses click's
    from click import ClickException as _CliError
from uvq.cli.common import STATE, eval_app
from uvq.errors import EXIT_REQUEUE, Stopped, UserError
from uvq.stopping import StopRequest

app = typer.Typer(
    name="uvq",
    help="Discrete absorbing diffusion over VQGAN codes (Unleashing Transformers): train, sample, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# One module per command group; each defines `register(app)`.
COMMAND_MODULES = (
    "uvq.cli.config",
    "uvq.cli.fit_vqgan",
    "uvq.cli.encode",
    "uvq.cli.fit_prior",
    "uvq.cli.sample",
    "uvq.cli.canvas",
    "uvq.cli.inpaint",
    "uvq.cli.evaluate",
    "uvq.cli.eval_elbo",
    "uvq.cli.eval_bpd",
    "uvq.cli.eval_sweep",
    "uvq.cli.neighbours",
    "uvq.cli.convert",
    "uvq.cli.pipeline",
    "uvq.cli.bench",
    "uvq.cli.webapp",
    "uvq.cli.report",
)

# The top-level help's panels, in one place: every command and group has exactly one.
PANELS = {
    "train": ("fit-vqgan", "encode", "fit-prior", "pipeline"),
    "generate": ("sample", "upscale-canvas", "inpaint", "app"),
    "evaluate": ("eval", "neighbours"),
    "models": ("import",),
    "tools": ("config", "ls", "bench", "report"),
}

# What an interrupted command leaves behind and how to go on, for the line it prints. Every
# option named here is one the command has (tests/test_cli_core.py checks it).
_RESUME_TRAINING = ("checkpoints written so far are kept in the run directory; rerun the same command "
                    "with --resume auto to continue from the last one")
INTERRUPT_HINTS = {
    "fit-vqgan": _RESUME_TRAINING,
    "fit-prior": _RESUME_TRAINING,
    "encode": "finished shards are kept; rerun the same command to encode the rest",
    "pipeline": "finished stages are kept; rerun the same command to continue",
    "config": "nothing was written",
    "ls": "nothing was written",
    "bench": "nothing was written",
    "app": "the app stopped; with --out, the files of finished requests are kept there",
    "report": "nothing was written (the page is written whole or not at all)",
    "eval sweep": "finished cells are kept; rerun the same command to continue",
}
_DEFAULT_HINT = "its output directory may be incomplete; rerun the command with --overwrite"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"uvq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable JSON summary on stdout; progress as JSON lines on stderr."),
) -> None:
    STATE.debug = STATE.debug or debug
    STATE.json = STATE.json or json_out


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)

if eval_app.registered_commands:
    app.add_typer(eval_app, name="eval")

_PANEL_OF = {name: panel for panel, names in PANELS.items() for name in names}
for _info in [*app.registered_commands, *app.registered_groups]:
    _info.rich_help_panel = _PANEL_OF[_info.name]


def _flags_without_metavar(command, ctx) -> None:
    """typer 0.2x prints the value type of every option, `<bool>` for flags too, though a flag
    takes no value; an empty metavar removes it (the built-in --help included)."""
    for param in [*command.params, command.get_help_option(ctx)]:
        if param is not None and getattr(param, "is_flag", False):
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _flags_without_metavar(sub, sub.context_class(sub, parent=ctx))


def build_command():
    """The click command tree of `app`, as `uvq` runs it."""
    command = typer.main.get_command(app)
    order = list(_PANEL_OF)  # the help lists panels, and commands within them, in PANELS' order
    command.commands = dict(sorted(command.commands.items(), key=lambda item: order.index(item[0])))
    _flags_without_metavar(command, command.context_class(command, **command.context_settings))
    return command


def _command_path(command, args: list[str]) -> list[str]:
    """The subcommand names in `args` (`["eval", "fid"]`), skipping the global options before them."""
    path = []
    for word in args:
        if word.startswith("-"):
            continue
        sub = getattr(command, "commands", {}).get(word)
        if sub is None:
            break
        path.append(word)
        command = sub
    return path


class Interrupted(KeyboardInterrupt):
    """A signal turned into an exception, so that `finally` blocks and the atomic writes' cleanup
    (uvq.files) run on SIGTERM exactly as they do on Ctrl-C."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# The same signal again within this many seconds of the one that asked the loop to stop is the
# same request delivered twice (docs/cluster.md), not the "second signal" that stops at once.
REPEAT_WINDOW_S = 1.0


def _install_signal_handlers(received: list[int], stop: StopRequest) -> dict[int, object]:
    """SIGTERM, SIGUSR1 (and SIGINT, where Python's own Ctrl-C handler is in place) append the
    signal's number to `received`; the first one while a loop watches `stop` asks it to stop
    after its step, any other raises `Interrupted` (a second signal stops at once; the same
    signal repeated within REPEAT_WINDOW_S is one delivery, not a second signal).

    A SIGINT that the parent ignores (a background job of a shell script) stays ignored. Returns
    the previous handlers; handlers can only be set from the main thread, elsewhere none are.
    """
    first_at: list[float] = []

    def interrupt(signum: int, frame) -> None:
        if stop.signum == signum and first_at and time.monotonic() - first_at[0] < REPEAT_WINDOW_S:
            return  # one signal delivered twice: SLURM signals torchrun and its workers, torchrun passes it on
        received.append(signum)
        if stop.watched and stop.signum is None:
            stop.request(signum)
            first_at.append(time.monotonic())
            return
        raise Interrupted(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
            previous[signum] = signal.signal(signum, interrupt)
    return previous


def hint_for(path: list[str] | tuple[str, ...]) -> str:
    """The interrupted command's hint: its own (`eval sweep`), its group's, or the default."""
    return INTERRUPT_HINTS.get(" ".join(path[:2]), INTERRUPT_HINTS.get(path[0], _DEFAULT_HINT))


def _interrupted(signum: int, path: list[str]) -> int:
    """Print the one line of an interrupted command and return its exit status."""
    name = signal.Signals(signum).name
    hint = hint_for(path) if path else None
    print(f"error: interrupted by {name}; {hint}" if hint else f"error: interrupted by {name}", file=sys.stderr)
    return 128 + signum


def _stopped(exc: Stopped, path: list[str]) -> int:
    """Print the one line of a command that stopped early with its state saved; return 75.

    Rank 0 also leaves the requeue marker in the command's output directories
    (uvq.files.mark_requeue): under torchrun the job script sees torchrun's 1, not this 75.
    """
    if os.environ.get("RANK", "0") == "0":
        from uvq.files import mark_requeue

        for out in exc.out_dirs:
            try:
                mark_requeue(out, exc.reason, exc.saved)
            except (OSError, UserError) as err:  # the state is saved; a missing marker only costs the requeue
                print(f"warning: could not leave the requeue marker in {out}: {err}", file=sys.stderr)
    again = " with --resume auto" if path and path[0] in ("fit-vqgan", "fit-prior") else ""
    print(f"error: {exc}; rerun the same command{again} to continue (exit {EXIT_REQUEUE}: requeue)", file=sys.stderr)
    return EXIT_REQUEUE


def normalise_resume(args: list[str]) -> list[str]:
    """`--resume` alone means `--resume=last` (the form before `--resume auto` existed); click
    options take a value or none, never either, so the bare flag is spelt out here."""
    out = list(args)
    for i, word in enumerate(out):
        if word == "--":
            break
        if word == "--resume" and (i + 1 >= len(out) or out[i + 1] not in ("auto", "last")):
            out[i] = "--resume=last"
    return out


def _leave_process_group() -> None:
    """Leave a torch.distributed group a command joined, so that the next command run in the same
    process (the tests run many) starts from none. Looked up, not imported: a command that
    never imported torch joined nothing."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _failed(exc: Exception) -> int:
    """Print the one line of a failed command (re-raise with --debug) and return its exit status."""
    if isinstance(exc, typer.Abort):
        print("error: aborted", file=sys.stderr)
        return 130
    if STATE.debug:
        raise exc
    if isinstance(exc, _CliError):
        message = exc.format_message()
        if message:  # `uvq` alone prints the help and an empty NoArgsIsHelp error
            print(f"error: {message}", file=sys.stderr)
        return 2
    if isinstance(exc, UserError):
        print(f"error: {exc}", file=sys.stderr)
        return 2
    msg = str(exc).splitlines()[0] if str(exc) else ""
    print(f"error: internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn exceptions into one line and an exit status (sys.exit)."""
    args = list(sys.argv[1:] if argv is None else argv)
    STATE.reset(argv=["uvq", *args], debug="--debug" in args)
    received: list[int] = []
    previous = _install_signal_handlers(received, STATE.stop)
    path: list[str] = []
    try:
        command = build_command()
        path = _command_path(command, args)
        # With standalone_mode=False click returns the exit code of `typer.Exit` (0 for --help
        # and --version) and turns a KeyboardInterrupt inside a command into the value 130.
        code = command.main(args=normalise_resume(args), prog_name="uvq", standalone_mode=False)
        if received or code == 130:
            code = _interrupted(received[-1] if received else signal.SIGINT, path)
    except Stopped as exc:  # stopped early on a signal or the time limit, its state saved
        code = _stopped(exc, path)
    except KeyboardInterrupt:  # outside the command (while the tree is built), or `Interrupted`
        code = _interrupted(received[-1] if received else signal.SIGINT, path)
    except Exception as exc:  # a signal's cleanup may fail too: the signal still decides the status
        code = _interrupted(received[-1], path) if received else _failed(exc)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _leave_process_group()
    sys.exit(code if isinstance(code, int) else 0)
