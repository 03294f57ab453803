"""`uvq inpaint`: regenerate regions of images, or grow them (section 4.5). A thin wrapper over
uvq.sampling.inpaint.inpaint_images;
its settings are the `inpaint` section (flags are shortcuts, `inpaint.key=value` overrides the rest)."""

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
)


def register(app: typer.Typer) -> None:
    @app.command("inpaint")
    def inpaint_cmd(
        inputs: Path = typer.Argument(..., metavar="IMAGE|FOLDER", help="An image, or a folder of images (with --masks DIR or --box)."),
        overrides: list[str] = typer.Argument(None, help="inpaint.key=value overrides, e.g. inpaint.stride=2."),
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
        n: int = typer.Option(None, "-n", "--count", help="inpaint.n: completions per input."),
        steps: int = typer.Option(None, "--steps", help="inpaint.steps: step budget T of a full chain (unset: N "
                                  "tokens); the chain starts at round(T * masked / N)."),
        temp: float = typer.Option(None, "--temp", help="inpaint.temp: temperature of softmax(logits / temp)."),
        dilate: int = typer.Option(None, "--dilate", help="inpaint.dilate: grow the latent mask by k latents."),
        composite: bool = typer.Option(False, "--composite", metavar="", help="inpaint.composite: paste the generated region "
                                       "into the original pixels."),
        feather: int = typer.Option(None, "--feather", help="inpaint.feather: with --composite, blend the edge "
                                    "over this many pixels."),
        seed: int = typer.Option(0, "--seed", help="Seed; completion j of input i depends only on (seed, i*n+j)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
        weights: str = typer.Option("default", "--weights", help="Prior weights: default, ema or model."),
        device: str = DeviceOpt,
        overwrite: bool = OverwriteOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Inpaint a region (mask PNG or boxes) or outpaint a border, with the paper's sampler."""
        from uvq.cli.sample import describe, generation_setup, on_rank0, rank_reporter
        from uvq.runtime import barrier, shutdown_distributed
        from uvq.sampling.inpaint import inpaint_images

        apply_local(json_flag, debug)
        rep = rank_reporter()
        ckpt, _, cfg = generation_setup("inpaint", prior=prior, run=run, recipe=recipe, overrides=overrides, shortcuts={
            "n": n, "steps": steps, "temp": temp, "dilate": dilate, "composite": composite or None,
            "feather": feather}, weights=weights, rep=rep)
        rep({"event": "log", "message": describe("inpaint", cfg)})
        try:
            summary = inpaint_images(
                ckpt, inputs, out, mask=mask, masks=masks, boxes=list(box or []), extend=extend, vqgan=vqgan,
                n=cfg.n, steps=cfg.steps, temp=cfg.temp, seed=seed, dilate_latents=cfg.dilate,
                composite_pixels=cfg.composite, feather_px=cfg.feather, stride=cfg.stride, windows=cfg.windows,
                batch_windows=cfg.batch_windows, sampler=cfg.sampler, options=cfg.options, weights=weights,
                allow_other_vqgan=cfg.allow_other_vqgan,
                device=device, precision=cfg.precision, max_memory_gb=cfg.max_memory_gb, overwrite=overwrite,
                progress=rep)
            barrier()  # every rank is done with its collectives before any leaves the group
        finally:
            rep.close()
            shutdown_distributed()
        if not on_rank0():
            return
        lines = [f"wrote {summary['n']} completions of {len(summary['inputs'])} input(s) to {summary['out_dir']}"]
        for rec in summary["inputs"]:
            lines.append(f"{rec['input']}: {rec['masked_latents']}/{rec['latents']} latents regenerated from "
                         f"t={rec['t_start']} of {rec['steps']}; grid {rec['grid']}")
        emit(summary, human="\n".join(lines))
