"""`uvq upscale-canvas`: images larger than the training size (Eq. 8). A thin wrapper over
uvq.sampling.canvas.upscale_canvas."""

from __future__ import annotations

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
    reporter,
)


def register(app: typer.Typer) -> None:
    @app.command("upscale-canvas")
    def upscale_canvas_cmd(
        prior: str = PriorOpt,
        run: Path = PriorRunOpt,
        recipe: str = PriorRecipeOpt,
        vqgan: str = VqganOpt,
        size: str = typer.Option(None, "--size", help="Canvas in pixels, HxW (multiples of the VQGAN's downsampling)."),
        latent_size: str = typer.Option(None, "--latent-size", help="Canvas in latents, hxw."),
        n: int = typer.Option(4, "--n", help="Number of canvases."),
        steps: int = typer.Option(None, "--steps", help="Step budget (default: the prior's N tokens; with "
                                  "--order raster, one step per canvas token)."),
        temp: float = typer.Option(0.8, "--temp", help="Temperature applied to the window mixture."),
        stride: int = typer.Option(1, "--stride", help="Stride between windows, 1..window size (edges always covered)."),
        windows: str = typer.Option("all", "--windows", help="all, or random:M (M windows per step, plus covering ones)."),
        wrap: bool = typer.Option(False, "--wrap", help="Windows wrap around the edges: the result tiles seamlessly."),
        order: str = typer.Option("random", "--order", help="random (the method, step budget) or raster "
                                  "(one token per step, the authors' code)."),
        batch_size: int = typer.Option(4, "--batch-size", help="Canvases sampled together."),
        batch_windows: int = typer.Option(256, "--batch-windows", help="Most windows per forward pass (memory)."),
        seed: int = typer.Option(0, "--seed", help="Seed; canvas i depends only on (seed, i)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
        weights: str = typer.Option("default", "--weights", help="Prior weights: default, ema or model."),
        precision: str = typer.Option("bf16", "--precision", help="bf16, fp16 or fp32 on CUDA (the CPU runs fp32)."),
        device: str = DeviceOpt,
        overwrite: bool = OverwriteOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Sample canvases larger than the training window by averaging the prior over windows (Eq. 8)."""
        from uvq.checkpoint import find_prior
        from uvq.runtime import UserError
        from uvq.sampling.canvas import parse_hw, upscale_canvas

        apply_local(json_flag, debug)
        if precision not in ("bf16", "fp16", "fp32"):
            raise UserError(f"--precision must be bf16, fp16 or fp32, not {precision!r}")
        rep = reporter()
        ckpt, where = find_prior(prior, run=run, recipe=recipe)
        rep({"event": "log", "message": f"prior: {ckpt} (from {where})"})
        try:
            summary = upscale_canvas(
                ckpt, out, vqgan=vqgan, size=parse_hw(size, "--size") if size else None,
                latent_size=parse_hw(latent_size, "--latent-size") if latent_size else None, n=n, steps=steps,
                temp=temp, seed=seed, stride=stride, windows=windows, wrap=wrap, order=order, batch_size=batch_size,
                batch_windows=batch_windows, weights=weights, device=device, precision=precision,
                overwrite=overwrite, progress=rep)
        finally:
            rep.close()
        c, t = summary["canvas"], summary["timing"]
        emit(summary, human=(f"wrote {summary['n']} canvases of {c['pixels'][0]}x{c['pixels'][1]} pixels to "
                             f"{summary['out_dir']} ({t['seconds_per_image']:.2f} s per image, "
                             f"{summary['network_passes_per_image']:.0f} window passes per image)\n"
                             f"grid: {summary['grid']}"))
