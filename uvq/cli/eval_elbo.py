"""`uvq eval elbo`: per-image negative ELBO (absorbing prior) or exact NLL (autoregressive prior) of a
latent split. A thin wrapper over uvq.prior.likelihood."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import typer

from uvq.cli.common import (
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    apply_local,
    emit,
    eval_app,
    reporter,
)


def register(app: typer.Typer) -> None:
    @eval_app.command("elbo")
    def eval_elbo_cmd(
        prior: Path = typer.Option(..., "--prior", help="Prior checkpoint or run directory (best, then last)."),
        latents: Path = typer.Option(..., "--latents", help="Latents directory written by `uvq encode`."),
        split: str = typer.Option("val", "--split", help="train or val."),
        estimator: str = typer.Option("full", "--estimator", help="full: sum over all t (one draw per t); "
                                                                  "mc: --draws single-t draws per image."),
        draws: int = typer.Option(16, "--draws", help="Draws per image for --estimator mc."),
        batch_size: int = typer.Option(64, "--batch-size", help="Images per batch."),
        max_images: int = typer.Option(None, "--max-images", help="Only the first N images of the split."),
        weights: str = typer.Option("default", "--weights", help="default, ema or model."),
        out: Path = typer.Option(None, "--out", "-o", help="Write elbo.csv and elbo.json here."),
        seed: int = typer.Option(0, "--seed", help="Seed of the masking draws."),
        device: str = DeviceOpt,
        overwrite: bool = OverwriteOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Negative ELBO (absorbing prior) or exact NLL (autoregressive prior) in bits per token for each image
        of a split (CSV), with mean and standard error."""
        from uvq.files import atomic_write_json, atomic_write_text, claim_out_dir
        from uvq.prior.likelihood import evaluate_elbo
        from uvq.runtime import UserError, shutdown_distributed

        apply_local(json_flag, debug)
        if estimator not in ("full", "mc"):
            raise UserError(f"--estimator must be full or mc, not {estimator!r}")
        if split not in ("train", "val"):
            raise UserError(f"--split must be train or val, not {split!r}")
        if out is not None:
            claim_out_dir(out, command="eval elbo", overwrite=overwrite, inputs=(prior, latents),
                          entries=("elbo.csv", "elbo.json"), lock=False)
        rep = reporter()
        try:
            result = evaluate_elbo(prior, latents, split=split, estimator=estimator, draws=draws,
                                   batch_size=batch_size, seed=seed, max_samples=max_images, weights=weights,
                                   device=device, progress=rep)
        finally:
            rep.close()
            shutdown_distributed()
        if result["rank"] != 0:
            return
        values, errors = result.pop("bits_per_token").tolist(), result.pop("stderr").tolist()
        keys = result.pop("keys")
        # The autoregressive prior's figure is its exact NLL; the absorbing prior's a bound on it (Eq. 6).
        metric = "negative log-likelihood (exact)" if result["exact"] else "negative ELBO"
        report = {"metric": metric, "unit": "bits per token", **result}
        if out is not None:
            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(["key", "bits_per_token", "stderr"])
            for k, v, e in zip(keys, values, errors, strict=True):
                writer.writerow([k, f"{v:.6f}", "" if e != e else f"{e:.6f}"])
            atomic_write_text(Path(out) / "elbo.csv", buf.getvalue())
            atomic_write_json(Path(out) / "elbo.json", report)
            report["csv"] = str(Path(out) / "elbo.csv")
        how = "exact, no bound: an autoregressive prior" if result["exact"] else f"{estimator} estimator"
        emit(report, human=f"{metric} over {result['num_images']} {split} images: {result['mean']:.4f} "
                           f"± {result['mean_stderr']:.4f} bits/token ({how}; log2 K = "
                           f"{result['log2_codebook']:.2f}; error over {result['num_groups']} image groups, a mirror "
                           f"copy with its image)" + (f"\nper-image values: {report['csv']}" if out else ""))
