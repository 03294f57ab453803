"""`uvq report RUN`: write RUN/report.html, one self-contained page. A thin wrapper over uvq.report."""

from __future__ import annotations

from pathlib import Path

import typer

from uvq.cli.common import DebugOpt, JsonOpt, apply_local, emit


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report_cmd(
        run: Path = typer.Argument(..., help="A run directory of fit-vqgan, fit-prior, sample, upscale-canvas, "
                                             "inpaint, eval or pipeline."),
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """One self-contained HTML page of a run: curves, grids, config, provenance, metrics (RUN/report.html)."""
        from uvq.report import write_report

        apply_local(json_flag, debug)
        path = write_report(run)
        emit({"report": str(path)}, human=f"report: {path}")
