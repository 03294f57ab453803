"""The `uvq` command: a Typer app whose subcommands are thin wrappers over library functions.

Error policy: a `UserError` (or a bad flag) prints one line `error: ...` on stderr and exits
2; any other exception prints one line and exits 1. `--debug` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys

import typer

from uvq import __version__

try:  # typer >= 0.2x vendors click and exposes its exception base here
    from typer import TyperException as _CliError
except ImportError:  # older typer re-uses click's
    from click import ClickException as _CliError
from uvq.cli.common import STATE, eval_app
from uvq.runtime import UserError

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
    "uvq.cli.neighbours",
    "uvq.cli.convert",
    "uvq.cli.pipeline",
    "uvq.cli.bench",
)


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


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn exceptions into one line and an exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    STATE.argv = ["uvq", *args]
    STATE.debug = "--debug" in args
    STATE.json = False
    try:
        app(args=args, standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except _CliError as exc:
        if STATE.debug:
            raise
        message = exc.format_message()
        if message:  # `uvq` alone prints the help and an empty NoArgsIsHelp error
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except UserError as exc:
        if STATE.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if STATE.debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
