"""`uvq upscale-canvas`: images larger than the training size (Eq. 8). A thin wrapper over
uvq.sampling.canvas.upscale_canvas;
its settings are the `canvas` section (flags are shortcuts, `canvas.key=value` overrides the rest)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from uvq.cli.common import (
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    PriorOpt,
    PriorRecipeOpt,
    PriorRunOpt,
    VqganOpt,
    apply_local,
    emit,
)


def register(app: typer.Typer) -> None:
    @app.command("upscale-canvas")
    def upscale_canvas_cmd(
        overrides: list[str] = typer.Argument(None, help="canvas.key=value overrides, e.g. canvas.batch_windows=64."),
        prior: str = PriorOpt,
        run: Path = PriorRunOpt,
        recipe: str = PriorRecipeOpt,
        vqgan: str = VqganOpt,
        size: str = typer.Option(None, "--size", help="canvas.size: HxW pixels (multiples of the VQGAN's downsampling)."),
        latent_size: str = typer.Option(None, "--latent-size", help="canvas.latent_size: hxw latents."),
        n: int = typer.Option(None, "-n", "--count", help="canvas.n: number of canvases."),
        steps: int = typer.Option(None, "--steps", help="canvas.steps: step budget (unset: the prior's N tokens; "
                                  "with --order raster, one step per canvas token)."),
        temp: float = typer.Option(None, "--temp", help="canvas.temp: temperature applied to the window mixture."),
        stride: int = typer.Option(None, "--stride", help="canvas.stride: between windows, 1..window size."),
        windows: str = typer.Option(None, "--windows", help="canvas.windows: all, or random:M (M windows per step)."),
        wrap: bool = typer.Option(False, "--wrap", metavar="", help="canvas.wrap: windows wrap around the edges (a tile)."),
        order: str = typer.Option(None, "--order", help="canvas.options.order: random (the method) or raster "
                                  "(one token per step, the authors' code)."),
        batch_size: int = typer.Option(None, "--batch-size", help="canvas.batch_size: canvases sampled together."),
        seed: int = typer.Option(0, "--seed", help="Seed; canvas i depends only on (seed, i)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
        weights: str = typer.Option("default", "--weights", help="Prior weights: default, ema or model."),
        device: str = DeviceOpt,
        overwrite: bool = OverwriteOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Sample canvases larger than the training window by averaging the prior over windows (Eq. 8)."""
        from uvq.cli.sample import describe, generation_setup, on_rank0, rank_reporter
        from uvq.runtime import barrier, shutdown_distributed
        from uvq.sampling.canvas import parse_hw, upscale_canvas

        apply_local(json_flag, debug)
        rep = rank_reporter()
        ckpt, _, cfg = generation_setup("canvas", prior=prior, run=run, recipe=recipe, overrides=overrides, shortcuts={
            "size": list(parse_hw(size, "--size")) if size else None,
            "latent_size": list(parse_hw(latent_size, "--latent-size")) if latent_size else None,
            "n": n, "steps": steps, "temp": temp, "stride": stride, "windows": windows, "wrap": wrap or None,
            "options.order": order, "batch_size": batch_size}, weights=weights, rep=rep)
        rep({"event": "log", "message": describe("canvas", cfg)})
        try:
            summary = upscale_canvas(ckpt, out, vqgan=vqgan, seed=seed, weights=weights, device=device,
                                     overwrite=overwrite, progress=rep, **dataclasses.asdict(cfg))
            barrier()  # every rank is done with its collectives before any leaves the group
        finally:
            rep.close()
            shutdown_distributed()
        if not on_rank0():
            return
        c, t = summary["canvas"], summary["timing"]
        emit(summary, human=(f"wrote {summary['n']} canvases of {c['pixels'][0]}x{c['pixels'][1]} pixels to "
                             f"{summary['out_dir']} ({t['seconds_per_image']:.2f} s per image, "
                             f"{summary['network_passes_per_image']:.0f} window passes per image)\n"
                             f"grid: {summary['grid']}"))
