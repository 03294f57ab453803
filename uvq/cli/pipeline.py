"""`uvq pipeline`: the whole method from one recipe. A thin wrapper over uvq.pipeline.run_pipeline."""

from __future__ import annotations

from pathlib import Path

import typer

from uvq.cli.common import (
    STATE,
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    TimeLimitOpt,
    apply_local,
    emit,
    reporter,
    time_limit_override,
)


def register(app: typer.Typer) -> None:
    @app.command("pipeline")
    def pipeline_cmd(
        recipe: str = typer.Argument(..., help="Recipe YAML path or packaged recipe name (demo, ffhq, ...)."),
        overrides: list[str] = typer.Argument(None, help="section.key=value overrides, e.g. prior_train.steps=500."),
        out: Path = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<recipe name>)."),
        until: str = typer.Option(None, "--until", help="Stop after this stage: fit-vqgan, encode, fit-prior, sample, eval."),
        device: str = DeviceOpt,
        time_limit: str = TimeLimitOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Run fit-vqgan, encode, fit-prior and sample (and eval) in order; complete stages are skipped."""
        from uvq.config import load_config
        from uvq.pipeline import run_pipeline

        apply_local(json_flag, debug)
        cfg = load_config(recipe, list(overrides or []) + time_limit_override(time_limit))
        out_dir = out if out is not None else Path("runs") / Path(recipe).stem
        rep = reporter()
        try:
            summary = run_pipeline(cfg, out_dir, device=device, until=until, progress=rep, argv=STATE.argv,
                                   stop=STATE.stop)
        finally:
            rep.close()
        lines = [f"{stage}: {info['status']} ({info['seconds']:.0f} s)" for stage, info in summary["stages"].items()]
        lines.append(f"pipeline finished in {summary['seconds']:.0f} s: {summary['out_dir']}")
        if summary["grid"]:
            lines.append(f"sample grid: {summary['grid']}")
        lines.append(f"report: {summary['report']}")
        emit(summary, human="\n".join(lines))
