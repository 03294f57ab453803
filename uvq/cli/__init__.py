"""The `uvq` command line: a Typer app (`uvq.cli.app`) and one thin module per command group."""
