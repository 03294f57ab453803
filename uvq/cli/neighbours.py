"""`uvq neighbours`: the k nearest training images of each sample by LPIPS (appendix C)."""

from __future__ import annotations

from pathlib import Path

import typer

from uvq.cli.common import (
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    OutOpt,
    OverwriteOpt,
    apply_local,
    emit,
)


def register(app: typer.Typer) -> None:
    @app.command("neighbours")
    def neighbours(
        samples: str = typer.Option(..., "--samples", help="Samples: image folder, `uvq sample` directory or shards."),
        reference: str = typer.Option(..., "--reference", help="Reference images (the training set): folder or shards."),
        k: int = typer.Option(10, "--k", help="Neighbours per sample."),
        out: Path = OutOpt,
        mode: str = typer.Option("exact", "--mode", help="exact: LPIPS to every reference image; fast: pixel pre-filter, LPIPS re-rank."),
        prefilter: int = typer.Option(100, "--prefilter", help="fast mode: candidates per sample kept by the pixel pre-filter."),
        max_samples: int = typer.Option(None, "--max-samples", help="Use only the first N samples."),
        batch_size: int = typer.Option(16, "--batch-size", help="Reference images per LPIPS trunk pass."),
        lpips_net: str = typer.Option("vgg", "--lpips-net", help="LPIPS trunk: vgg, alex or squeeze."),
        device: str = DeviceOpt,
        overwrite: bool = OverwriteOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Nearest training images of each sample by LPIPS: a PNG grid, a CSV and a JSON report in --out."""
        from uvq.cli.sample import on_rank0, rank_reporter
        from uvq.evaluation.neighbours import MODES
        from uvq.evaluation.neighbours import neighbours as run
        from uvq.files import claim_out_dir
        from uvq.runtime import (
            UserError,
            barrier,
            init_distributed,
            on_main,
            resolve_device,
            shutdown_distributed,
        )
        from uvq.vqgan.losses import load_lpips

        apply_local(json_flag, debug)
        if mode not in MODES:
            raise UserError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
        dev = resolve_device(device)
        model = load_lpips(lpips_net, alternative="or choose another trunk with --lpips-net alex|squeeze")
        # Under torchrun the ranks split the reference (uvq.evaluation.neighbours); rank 0 claims
        # --out and writes the files.
        init_distributed(dev)
        out_dir = Path(on_main(lambda: str(claim_out_dir(
            out, command="neighbours", overwrite=overwrite, inputs=(samples, reference),
            entries=("neighbours.png", "neighbours.csv", "neighbours.json"), lock=False).path)))
        rep = rank_reporter()
        try:
            report = run(samples, reference, out_dir, lpips_model=model, lpips_name=lpips_net, k=k, mode=mode,
                         prefilter=prefilter, batch_size=batch_size, device=dev, max_samples=max_samples, progress=rep)
            barrier()
        finally:
            rep.close()
            shutdown_distributed()
        if not on_rank0():
            return
        emit(report, human=f"{len(report['neighbours'])} samples x {k} neighbours ({mode}) -> "
                           f"{report['files']['grid']}, {report['files']['csv']}")
