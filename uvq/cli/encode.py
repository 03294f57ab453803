"""`uvq encode`: images to latent shards with a VQGAN checkpoint. A thin wrapper over uvq.prior.latents."""

from __future__ import annotations

from pathlib import Path

import typer

from uvq.cli.common import (
    STATE,
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    TimeLimitOpt,
    apply_local,
    emit,
    reporter,
    time_limit_override,
)


def register(app: typer.Typer) -> None:
    @app.command("encode")
    def encode_cmd(
        vqgan: Path = typer.Option(..., "--vqgan", help="VQGAN checkpoint or run directory (best, then last)."),
        out: Path = typer.Option(..., "--out", "-o", help="Latents directory (shards + manifest.json)."),
        data: str = typer.Option(None, "--data", help="Data source: demo, an image folder, or webdataset shards "
                                                       "(default: the recipe's data.source)."),
        recipe: str = typer.Option(None, "--recipe", help="Recipe (YAML path or packaged name) for the data and encode sections "
                                                           "(default: the VQGAN checkpoint's own config)."),
        overrides: list[str] = typer.Argument(None, help="section.key=value overrides (data.*, encode.*)."),
        batch_size: int = typer.Option(None, "--batch-size", help="Images per encoder pass (default: encode.batch_size)."),
        flip_copies: bool = typer.Option(None, "--flip-copies/--no-flip-copies",
                                         help="Also store codes of horizontally flipped images (<key>.flip)."),
        weights: str = typer.Option(None, "--weights", help="default, ema or model (default: encode.weights, "
                                                            "i.e. the checkpoint's default, EMA when present)."),
        device: str = DeviceOpt,
        time_limit: str = TimeLimitOpt,
        overwrite: bool = OverwriteOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Encode a dataset to webdataset shards of VQGAN codes (train and val splits); resumable."""
        from uvq.checkpoint import load_model, read_meta, resolve_checkpoint, verify_checkpoint
        from uvq.config import config_from_dict, load_config
        from uvq.prior.latents import encode_dataset, encode_out_check
        from uvq.runtime import UserError, init_distributed, resolve_device, shutdown_distributed
        from uvq.stopping import from_run_config

        apply_local(json_flag, debug)
        extra = list(overrides or []) + time_limit_override(time_limit)
        if data is not None:
            extra.append(f"data.source={data}")
        if recipe is not None:
            cfg = load_config(recipe, extra)
        else:  # the data settings the VQGAN was trained with, so that the same val split is held out
            from uvq.config import apply_overrides
            from uvq.prior.latents import check_recorded_source

            saved = read_meta(vqgan).get("config")
            cfg = config_from_dict(apply_overrides(saved, extra)) if saved else load_config(None, extra)
            if saved and not any(o.startswith("data.source=") for o in extra):  # the source is the checkpoint's
                check_recorded_source(cfg.data.source, f"VQGAN checkpoint {vqgan}'s meta.json")
        which = weights or cfg.encode.weights
        if which not in ("default", "ema", "model"):
            raise UserError(f"--weights must be default, ema or model, not {which!r}")
        dev = resolve_device(device)
        verify_checkpoint(resolve_checkpoint(vqgan), "vqgan")  # every weight file, before anything is written
        encode_out_check(out, vqgan=vqgan, data_source=cfg.data.source, overwrite=overwrite)  # before loading
        info = init_distributed(dev, cfg.run.dist_timeout_s)
        model, meta = load_model(vqgan, "vqgan", weights=which, device=dev)
        rep = reporter()
        try:
            manifest = encode_dataset(model, meta, cfg.data, out,
                                      batch_size=batch_size or cfg.encode.batch_size, shard_size=cfg.encode.shard_size,
                                      flip_copies=cfg.encode.flip_copies if flip_copies is None else flip_copies,
                                      weights=which, device=dev, overwrite=overwrite, progress=rep,
                                      stop=from_run_config(STATE.stop, cfg.run))
        finally:
            rep.close()
            shutdown_distributed()
        if not info.is_main:
            return
        n = manifest["num_samples"]
        summary = {"out_dir": str(out), "num_samples": n, "latent_shape": manifest["latent_shape"],
                   "codebook_size": manifest["codebook_size"], "shards": len(manifest["shards"]),
                   "encoded": manifest.get("encoded"), "skipped": manifest.get("skipped"),
                   "seconds": manifest.get("seconds"), "tokenizer": manifest["tokenizer"]}
        emit(summary, human=f"wrote {n['train']} train and {n['val']} val code grids "
                            f"{manifest['latent_shape']} in {len(manifest['shards'])} shards to {out} "
                            f"({manifest.get('encoded')} encoded, {manifest.get('skipped')} already done, "
                            f"{manifest.get('seconds')} s)")
