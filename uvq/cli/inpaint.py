"""`uvq inpaint`: regenerate regions of images, or grow them (section 4.5). A thin wrapper over
uvq.sampling.inpaint.inpaint_images."""

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
    @app.command("inpaint")
    def inpaint_cmd(
        inputs: Path = typer.Argument(..., metavar="IMAGE|FOLDER", help="An image, or a folder of images (with --masks DIR or --box)."),
        mask: Path = typer.Option(None, "--mask", help="Mask PNG the size of the image; white = regenerate."),
        masks: Path = typer.Option(None, "--masks", help="Folder of masks for a folder of images: <stem>.png."),
        box: list[str] = typer.Option(None, "--box", help="Region x0,y0,x1,y1 in the image's pixels (x1, y1 "
                                      "exclusive); repeat for several."),
        extend: str = typer.Option(None, "--extend", help="Outpaint: grow the (fitted) image, e.g. left=64,right=64 "
                                   "(pixels, multiples of the downsampling factor)."),
        prior: str = PriorOpt,
        run: Path = PriorRunOpt,
        recipe: str = PriorRecipeOpt,
        vqgan: str = VqganOpt,
        n: int = typer.Option(8, "--n", help="Completions per input."),
        steps: int = typer.Option(None, "--steps", help="Step budget T of a full chain (default: N tokens); the "
                                  "chain starts at round(T * masked / N)."),
        temp: float = typer.Option(0.9, "--temp", help="Temperature of softmax(logits / temp)."),
        dilate: int = typer.Option(0, "--dilate", help="Grow the latent mask by k latents."),
        composite: bool = typer.Option(False, "--composite", help="Paste the generated region into the original pixels."),
        feather: int = typer.Option(0, "--feather", help="With --composite: blend the edge over this many pixels."),
        stride: int = typer.Option(1, "--stride", help="Window stride when the result is larger than the window."),
        windows: str = typer.Option("all", "--windows", help="all, or random:M (outpainting beyond the window)."),
        batch_windows: int = typer.Option(256, "--batch-windows", help="Most windows per forward pass (memory)."),
        seed: int = typer.Option(0, "--seed", help="Seed; completion j of input i depends only on (seed, i*n+j)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
        weights: str = typer.Option("default", "--weights", help="Prior weights: default, ema or model."),
        precision: str = typer.Option("bf16", "--precision", help="bf16, fp16 or fp32 on CUDA (the CPU runs fp32)."),
        device: str = DeviceOpt,
        overwrite: bool = OverwriteOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Inpaint a region (mask PNG or boxes) or outpaint a border, with the paper's sampler."""
        from uvq.checkpoint import find_prior
        from uvq.runtime import UserError
        from uvq.sampling.inpaint import inpaint_images

        apply_local(json_flag, debug)
        if precision not in ("bf16", "fp16", "fp32"):
            raise UserError(f"--precision must be bf16, fp16 or fp32, not {precision!r}")
        if feather and not composite:
            raise UserError("--feather blends the pasted edge, so it needs --composite")
        rep = reporter()
        ckpt, where = find_prior(prior, run=run, recipe=recipe)
        rep({"event": "log", "message": f"prior: {ckpt} (from {where})"})
        try:
            summary = inpaint_images(
                ckpt, inputs, out, mask=mask, masks=masks, boxes=list(box or []), extend=extend, vqgan=vqgan, n=n,
                steps=steps, temp=temp, seed=seed, dilate_latents=dilate, composite_pixels=composite,
                feather_px=feather, stride=stride, windows=windows, batch_windows=batch_windows, weights=weights,
                device=device, precision=precision, overwrite=overwrite, progress=rep)
        finally:
            rep.close()
        lines = [f"wrote {summary['n']} completions of {len(summary['inputs'])} input(s) to {summary['out_dir']}"]
        for rec in summary["inputs"]:
            lines.append(f"{rec['input']}: {rec['masked_latents']}/{rec['latents']} latents regenerated from "
                         f"t={rec['t_start']} of {rec['steps']}; grid {rec['grid']}")
        emit(summary, human="\n".join(lines))
