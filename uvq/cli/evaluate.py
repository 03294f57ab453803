"""`uvq eval fid|kid|prdc|recon`: thin commands over uvq.evaluation.metrics (docs/method.md section 6)."""

from __future__ import annotations

from pathlib import Path

import typer

from uvq.cli.common import (
    STATE,
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    apply_local,
    emit,
    eval_app,
    reporter,
)

SamplesOpt = typer.Option(..., "--samples", help="Samples: image folder, `uvq sample` directory, webdataset shards, or features (.npy/.safetensors).")
ReferenceOpt = typer.Option(..., "--reference", help="Reference (the training set): as --samples, or a mu/sigma statistics file (.npz, FID only).")
ReportOutOpt = typer.Option(None, "--out", "-o", help="Directory for the report (default: beside the samples).")
RecipeOpt = typer.Option(None, "--recipe", help="Recipe (YAML path or packaged name) whose eval section gives the "
                         "settings (extractor, k, batch size, weights).")
# No recipe run is involved, so the seed defaults to 0 (not to a recipe's run.seed).
EvalSeedOpt = typer.Option(0, "--seed", help="Seed of KID's random subsets (recorded in every report).")
WeightsOpt = typer.Option(None, "--inception-weights", help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (offline use).")
BatchOpt = typer.Option(None, "--batch-size", help="Images per extractor batch (default: the recipe's eval.batch_size).")
CacheOpt = typer.Option(None, "--cache-dir", help="Feature cache (default: $UVQ_CACHE/features or ~/.cache/uvq/features).")


def _eval_config(recipe: str | None, **changes):
    from uvq.config import EvalConfig, load_config
    from uvq.evaluation.reconstruction import replace_eval

    cfg = load_config(recipe).eval if recipe else EvalConfig()
    cfg = replace_eval(cfg, **changes)
    cfg.validate("eval")
    return cfg


def _report_path(out: Path | None, samples: str, name: str) -> Path:
    from uvq.evaluation.metrics import default_report_path

    return Path(out) / f"eval-{name}.json" if out is not None else default_report_path(samples, name)


def _set_metric(metric: str, samples: str, reference: str, out: Path | None, recipe: str | None,
                inception_weights: Path | None, batch_size: int | None, cache_dir: Path | None, k: int | None,
                device: str, seed: int, overwrite: bool) -> None:
    from uvq.cli.sample import on_rank0, rank_reporter
    from uvq.evaluation.metrics import evaluate_metrics, write_report
    from uvq.runtime import barrier, init_distributed, resolve_device, shutdown_distributed

    cfg = _eval_config(recipe, inception_weights=str(inception_weights) if inception_weights else None,
                       batch_size=batch_size, k=k)
    path = _report_path(out, samples, metric)
    dev = resolve_device(device)
    # Under torchrun the ranks extract disjoint parts of each set (uvq.evaluation.features); every
    # rank then holds the features and the metric, and rank 0 writes the report.
    init_distributed(dev)
    rep = rank_reporter()
    try:
        report = evaluate_metrics([metric], samples, reference, cfg_eval=cfg, device=dev,
                                  progress=rep, seed=seed, cache_dir=cache_dir)
        barrier()
    finally:
        rep.close()
        shutdown_distributed()
    if not on_rank0():
        return
    report["command"] = " ".join(STATE.argv)
    write_report(report, path, overwrite=overwrite)
    report["report"] = str(path)
    res = report["results"]
    human = {"fid": lambda: f"FID {res['fid']:.4f}",
             "kid": lambda: f"KID {res['kid']:.6f} ± {res['kid_std']:.6f}",
             "prdc": lambda: (f"precision {res['precision']:.4f}  recall {res['recall']:.4f}  "
                              f"density {res['density']:.4f}  coverage {res['coverage']:.4f}  (k={res['k']})")}[metric]()
    emit(report, human=f"{human}  ({report['samples']['n_images']} samples; report {path})")


def register(app: typer.Typer) -> None:
    @eval_app.command("fid")
    def fid(samples: str = SamplesOpt, reference: str = ReferenceOpt, out: Path = ReportOutOpt,
            recipe: str = RecipeOpt, inception_weights: Path = WeightsOpt, batch_size: int = BatchOpt,
            cache_dir: Path = CacheOpt, device: str = DeviceOpt, seed: int = EvalSeedOpt, overwrite: bool = OverwriteOpt,
            json_flag: bool = JsonOpt, debug: bool = DebugOpt) -> None:
        """Fréchet Inception distance of samples against a reference (2048-d inception-v3-compat features)."""
        apply_local(json_flag, debug)
        _set_metric("fid", samples, reference, out, recipe, inception_weights, batch_size, cache_dir, None,
                    device, seed, overwrite)

    @eval_app.command("kid")
    def kid(samples: str = SamplesOpt, reference: str = ReferenceOpt, out: Path = ReportOutOpt,
            recipe: str = RecipeOpt, inception_weights: Path = WeightsOpt, batch_size: int = BatchOpt,
            cache_dir: Path = CacheOpt, device: str = DeviceOpt, seed: int = EvalSeedOpt, overwrite: bool = OverwriteOpt,
            json_flag: bool = JsonOpt, debug: bool = DebugOpt) -> None:
        """Kernel Inception distance (torch-fidelity: 100 subsets of 1000, cubic kernel; --seed picks the subsets)."""
        apply_local(json_flag, debug)
        _set_metric("kid", samples, reference, out, recipe, inception_weights, batch_size, cache_dir, None,
                    device, seed, overwrite)

    @eval_app.command("prdc")
    def prdc(samples: str = SamplesOpt, reference: str = ReferenceOpt,
             k: int = typer.Option(None, "--k", help="Nearest neighbours (default 5 as the prdc package; the paper's code used 3)."),
             out: Path = ReportOutOpt, recipe: str = RecipeOpt, inception_weights: Path = WeightsOpt,
             batch_size: int = BatchOpt, cache_dir: Path = CacheOpt, device: str = DeviceOpt, seed: int = EvalSeedOpt,
             overwrite: bool = OverwriteOpt, json_flag: bool = JsonOpt, debug: bool = DebugOpt) -> None:
        """Precision, recall, density and coverage (Naeem et al. 2020), in bounded memory."""
        apply_local(json_flag, debug)
        _set_metric("prdc", samples, reference, out, recipe, inception_weights, batch_size, cache_dir, k,
                    device, seed, overwrite)

    @eval_app.command("recon")
    def recon(vqgan: str = typer.Option(..., "--vqgan", help="VQGAN checkpoint or run directory."),
              data: str = typer.Option(..., "--data", help="Image folder or webdataset shards."),
              split: str = typer.Option("val", "--split", help="val, train or all (the training run's own split)."),
              out: Path = typer.Option(None, "--out", "-o", help="Directory for the report and grid (default: the checkpoint's run directory)."),
              max_images: int = typer.Option(None, "--max-images", help="Use at most this many images of the source."),
              batch_size: int = typer.Option(32, "--batch-size", help="Images per batch."),
              no_lpips: bool = typer.Option(False, "--no-lpips", help="Skip LPIPS (needs torchvision's VGG16 weights)."),
              lpips_net: str = typer.Option("vgg", "--lpips-net", help="LPIPS trunk: vgg, alex or squeeze."),
              no_fid: bool = typer.Option(False, "--no-fid", help="Skip reconstruction FID (needs the Inception weights)."),
              inception_weights: Path = WeightsOpt, recipe: str = RecipeOpt,
              weights: str = typer.Option("default", "--weights", help="default, ema or model."),
              device: str = DeviceOpt, overwrite: bool = OverwriteOpt,
              json_flag: bool = JsonOpt, debug: bool = DebugOpt) -> None:
        """PSNR, LPIPS, reconstruction FID and codebook usage of a VQGAN, with a grid of originals and reconstructions."""
        from uvq.checkpoint import resolve_checkpoint
        from uvq.evaluation.metrics import write_report
        from uvq.evaluation.reconstruction import evaluate_vqgan
        from uvq.runtime import resolve_device

        apply_local(json_flag, debug)
        ckpt = resolve_checkpoint(vqgan)
        cfg = None if no_fid else _eval_config(recipe, inception_weights=str(inception_weights) if inception_weights else None)
        if out is None:
            out = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        path = Path(out) / f"eval-recon-{split}.json"
        grid = Path(out) / f"recon-{split}.png"
        if grid.exists() and not overwrite and not path.exists():
            from uvq.runtime import UserError

            raise UserError(f"{grid} exists and was not written by `uvq eval recon`; pass --overwrite or choose another --out")
        rep = reporter()
        try:
            report = evaluate_vqgan(ckpt, data, split=split, batch_size=batch_size, max_images=max_images,
                                    lpips_net=None if no_lpips else lpips_net, cfg_eval=cfg,
                                    device=resolve_device(device), grid_path=grid, weights=weights, progress=rep)
        finally:
            rep.close()
        report["command"] = " ".join(STATE.argv)
        write_report(report, path, overwrite=overwrite)
        report["report"] = str(path)
        r = report["results"]
        parts = [f"PSNR {r['psnr']:.3f} dB"]
        if r["lpips"] is not None:
            parts.append(f"LPIPS {r['lpips']:.4f}")
        if r["rfid"] is not None:
            parts.append(f"rFID {r['rfid']:.3f}")
        parts.append(f"codes used {r['codes_used']}/{r['codebook_size']}, perplexity {r['perplexity']:.1f}")
        emit(report, human=f"{'  '.join(parts)}  ({r['n_images']} images; report {path})")
