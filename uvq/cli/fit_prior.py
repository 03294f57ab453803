"""`uvq fit-prior`: train stage two (the absorbing prior) on latent shards. A thin wrapper over uvq.prior.train."""

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
    @app.command("fit-prior")
    def fit_prior_cmd(
        recipe: str = typer.Argument(..., help="Recipe YAML path or packaged recipe name (demo, ffhq, churches, bedroom)."),
        overrides: list[str] = typer.Argument(None, help="section.key=value overrides, e.g. prior_train.batch_size=20."),
        latents: Path = typer.Option(..., "--latents", help="Latents directory written by `uvq encode`."),
        out: Path = typer.Option(None, "--out", "-o", help="Run directory (default: runs/prior-<recipe name>)."),
        vqgan: str = typer.Option(None, "--vqgan", help="The VQGAN checkpoint the latents must come from "
                                                        "(overrides prior_train.vqgan); mismatched shards are refused."),
        device: str = DeviceOpt,
        seed: int = SeedOpt,
        resume: str = ResumeOpt,
        time_limit: str = TimeLimitOpt,
        overwrite: bool = OverwriteOpt,
        dry_run: bool = typer.Option(False, "--dry-run", help="Validate everything, print the resolved config and exit."),
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Train the prior (stage two; absorbing, or autoregressive by prior_train.process) with validation and best-checkpoint selection."""
        from uvq.config import load_config, to_yaml
        from uvq.prior.train import check_fit_prior, fit_prior
        from uvq.runtime import shutdown_distributed
        from uvq.training import resolve_resume

        apply_local(json_flag, debug)
        extra = list(overrides or [])
        if seed is not None:
            extra.append(f"run.seed={seed}")
        extra += time_limit_override(time_limit)
        cfg = load_config(recipe, extra)
        out_dir = out if out is not None else Path("runs") / f"prior-{Path(recipe).stem}"

        if dry_run:
            plan = check_fit_prior(cfg, latents, out_dir, device=device, vqgan=vqgan,
                                   resume=resolve_resume(resume, out_dir), overwrite=overwrite)
            lines = [to_yaml(cfg).rstrip(), "",
                     f"dry run: would train {plan['steps']} steps on {plan['device']} into {plan['out_dir']} "
                     f"({plan['prior_params'] / 1e6:.2f}M parameters) on {plan['num_samples']['train']} train / "
                     f"{plan['num_samples']['val']} val code grids; nothing was written"]
            emit({"dry_run": True, "config": cfg.to_dict(), **plan}, human="\n".join(lines))
            return

        rep = reporter()
        try:
            summary = fit_prior(cfg, latents, out_dir, device=device, resume=resume, overwrite=overwrite,
                                vqgan=vqgan, progress=rep, argv=STATE.argv, stop=STATE.stop)
        finally:
            rep.close()
            shutdown_distributed()
        if summary.get("rank", 0) != 0:
            return
        best, last = summary["best"], summary["last_val_bits_per_token"]
        human = (f"trained {summary['steps']} steps in {summary['out_dir']}\n"
                 + (f"validation {summary['val_metric']}: {last:.4f} bits/token " if last is not None
                    else f"validation {summary['val_metric']}: not run ")
                 + f"(untrained ~ log2 K = {summary['log2_codebook']:.2f}); best {best['val_bits_per_token']:.4f} "
                 f"at step {best['step']}\n"
                 f"checkpoint: {summary['last_checkpoint']}")
        emit(summary, human=human)
