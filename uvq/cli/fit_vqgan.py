"""`uvq fit-vqgan`: train stage one (the VQGAN) from a recipe. A thin wrapper over uvq.vqgan.train."""

from __future__ import annotations

from pathlib import Path

import typer

from uvq.cli.common import (
    STATE,
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    ResumeOpt,
    SeedOpt,
    TimeLimitOpt,
    apply_local,
    emit,
    reporter,
    time_limit_override,
)


def register(app: typer.Typer) -> None:
    @app.command("fit-vqgan")
    def fit_vqgan_cmd(
        recipe: str = typer.Argument(..., help="Recipe YAML path or packaged recipe name (demo, ffhq, churches, bedroom)."),
        overrides: list[str] = typer.Argument(None, help="section.key=value overrides, e.g. train.batch_size=4."),
        out: Path = typer.Option(None, "--out", "-o", help="Run directory (default: runs/vqgan-<recipe name>)."),
        device: str = DeviceOpt,
        seed: int = SeedOpt,
        resume: str = ResumeOpt,
        time_limit: str = TimeLimitOpt,
        overwrite: bool = OverwriteOpt,
        dry_run: bool = typer.Option(False, "--dry-run", help="Validate everything, print the resolved config and exit."),
        strict: bool = typer.Option(False, "--strict", help="Fail on the first unreadable image instead of skipping it."),
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Train the VQGAN (stage one): L1 + LPIPS + codebook + adaptive-weight PatchGAN, with EMA."""
        from uvq.config import load_config, to_yaml
        from uvq.training import resolve_resume
        from uvq.vqgan.train import check_fit_vqgan, fit_vqgan

        apply_local(json_flag, debug)
        extra = list(overrides or [])
        if seed is not None:
            extra.append(f"run.seed={seed}")
        extra += time_limit_override(time_limit)
        if strict:
            extra.append("data.strict=true")
        cfg = load_config(recipe, extra)
        out_dir = out if out is not None else Path("runs") / f"vqgan-{Path(recipe).stem}"

        if dry_run:
            plan = check_fit_vqgan(cfg, out_dir, device=device, resume=resolve_resume(resume, out_dir),
                                   overwrite=overwrite)
            lines = [to_yaml(cfg).rstrip(), "",
                     f"dry run: would train {plan['steps']} steps on {plan['device']} into {plan['out_dir']} "
                     f"({plan['vqgan_params'] / 1e6:.1f}M autoencoder + {plan['disc_params'] / 1e6:.2f}M discriminator "
                     f"parameters); nothing was written"]
            emit({"dry_run": True, "config": cfg.to_dict(), **plan}, human="\n".join(lines))
            return

        rep = reporter()
        try:
            summary = fit_vqgan(cfg, out_dir, device=device, resume=resume, overwrite=overwrite,
                                progress=rep, argv=STATE.argv, stop=STATE.stop)
        finally:
            rep.close()
        if summary.get("rank", 0) != 0:
            return
        human = (f"trained {summary['steps']} steps ({summary['images_per_s']:.1f} images/s) in {summary['out_dir']}\n"
                 f"reconstruction grid: {summary['last_grid']}\n"
                 f"checkpoint: {summary['last_checkpoint']}")
        if summary.get("bad_images"):
            human += f"\nskipped {summary['bad_images']} unreadable images (see the warnings above)"
        emit(summary, human=human)
