"""Stage one quality: reconstruction metrics of a VQGAN (PSNR, LPIPS, rFID, codebook usage; the paper's Table 5).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from uvq import __version__
from uvq.evaluation.features import (
    InceptionFeatures,
    feature_statistics,
)

# ---------------------------------------------------------------------------------------------
# Stage one: reconstruction quality of the VQGAN (Table 5)
# ---------------------------------------------------------------------------------------------
from uvq.evaluation.metrics import REPORT_MARKER, _build_extractor, frechet_distance
from uvq.progress import ProgressFn, null_progress
from uvq.runtime import UserError
from uvq.vqgan.model import perplexity


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0,1]: 10 log10(1 / MSE). [B,3,H,W] x2 -> [B]."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


def codebook_usage(counts: torch.Tensor) -> dict[str, Any]:
    """Codes used and the perplexity exp(H(p)) of the empirical code distribution p = counts / sum."""
    counts = counts.double()
    return {"codes_used": int((counts > 0).sum()), "codebook_size": int(counts.numel()),
            "perplexity": float(perplexity(counts))}


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


@torch.no_grad()
def evaluate_reconstruction(vqgan: torch.nn.Module, batches, *, device: torch.device | str = "cpu",
                            lpips_model: torch.nn.Module | None = None, extractor: InceptionFeatures | None = None,
                            grid_path: str | Path | None = None, grid_images: int = 8,
                            progress: ProgressFn | None = None, total: int | None = None) -> dict[str, Any]:
    """PSNR, LPIPS, reconstruction FID and codebook usage of `vqgan` over `batches` of [B,3,H,W] in [0,1].

    LPIPS is skipped without `lpips_model`, rFID without `extractor` (both need pretrained
    weights). rFID compares the originals' and reconstructions' features, both quantised to
    uint8 as an image file would be. The grid shows originals above their reconstructions.
    """
    progress = progress or null_progress
    device = torch.device(device)
    vqgan = vqgan.to(device).eval()
    codebook_size = int(getattr(vqgan, "codebook_size", 0) or vqgan.quantize.codebook_size)
    counts = torch.zeros(codebook_size, dtype=torch.int64)
    psnrs, lpipss, f_real, f_fake = [], [], [], []
    shown: list[torch.Tensor] = []
    progress({"event": "start", "task": "recon", "total": total, "unit": "img"})
    for x in batches:
        x = x.to(device).float()
        xrec, codes, _ = vqgan(x)  # [B,3,H,W], [B,h,w]
        xrec = xrec.clamp(0, 1)
        counts += torch.bincount(codes.flatten().cpu(), minlength=codebook_size)
        psnrs.append(psnr(x, xrec).cpu())
        if lpips_model is not None:
            lpipss.append(lpips_model(x, xrec, normalize=True).flatten().cpu())
        if extractor is not None:
            f_real.append(extractor(_to_uint8(x)))
            f_fake.append(extractor(_to_uint8(xrec)))
        have = sum(p.shape[1] for p in shown)
        if have < grid_images:
            take = min(x.shape[0], grid_images - have)
            shown.append(torch.stack([x[:take].cpu(), xrec[:take].cpu()]))  # [2,t,3,H,W]
        progress({"event": "advance", "task": "recon", "n": x.shape[0],
                  "metrics": {"psnr": float(torch.cat(psnrs).mean())}})
    progress({"event": "end", "task": "recon"})
    if not psnrs:
        raise UserError("the reconstruction split holds no images; check --data and --split")
    results: dict[str, Any] = {"n_images": int(torch.cat(psnrs).numel()), "psnr": float(torch.cat(psnrs).mean())}
    results["lpips"] = float(torch.cat(lpipss).mean()) if lpipss else None
    if extractor is not None:
        real, fake = torch.cat(f_real).numpy(), torch.cat(f_fake).numpy()
        results["rfid"] = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    else:
        results["rfid"] = None
    results.update(codebook_usage(counts))
    if grid_path is not None and shown:
        pairs = torch.cat(shown, dim=1)  # [2, G, 3, H, W]
        from uvq.images import save_grid

        save_grid(pairs.flatten(0, 1), grid_path, nrow=pairs.shape[1], row_labels=["original", "reconstruction"])
        results["grid"] = str(grid_path)
    return results


def replace_eval(cfg_eval, **changes):
    """An `EvalConfig` with some fields changed (those given as not None)."""
    return dataclasses.replace(cfg_eval, **{k: v for k, v in changes.items() if v is not None})


def evaluate_vqgan(checkpoint: str | Path, data: str, *, split: str = "val", batch_size: int = 32,
                   max_images: int | None = None, lpips_net: str | None = "vgg", cfg_eval=None,
                   device: torch.device | str = "cpu", grid_path: str | Path | None = None, weights: str = "default",
                   progress: ProgressFn | None = None) -> dict[str, Any]:
    """`uvq eval recon`: the VQGAN checkpoint's reconstruction metrics on a split of `data`.

    The split is the training run's own (its data.val_fraction, by key), images prepared at the
    VQGAN's size as in training. `lpips_net=None` skips LPIPS; `cfg_eval=None` skips rFID.
    """
    from uvq.checkpoint import load_model
    from uvq.config import DataConfig, section_from_dict
    from uvq.data.streams import iterate_images

    progress = progress or null_progress
    device = torch.device(device)
    vqgan, meta = load_model(checkpoint, "vqgan", weights=weights, device=device)
    run_data = (meta.get("config") or {}).get("data")
    data_cfg = section_from_dict(DataConfig, run_data, "data") if run_data else DataConfig()
    data_cfg = dataclasses.replace(data_cfg, source=data, max_images=max_images, hflip=False)
    lpips_model = None
    if lpips_net is not None:
        from uvq.vqgan.losses import load_lpips

        lpips_model = load_lpips(lpips_net, alternative="or pass --no-lpips").to(device)
    extractor = _build_extractor(cfg_eval, device) if cfg_eval is not None else None
    img_size = int(meta["model_config"]["img_size"])
    stream = iterate_images(data_cfg, img_size, split=split, batch_size=batch_size, progress=progress)
    results = evaluate_reconstruction(vqgan, (b["image"] for b in stream), device=device, lpips_model=lpips_model,
                                      extractor=extractor, grid_path=grid_path, progress=progress, total=stream.total)
    warnings = []
    if stream.stats.skipped:
        warnings.append(f"data: {stream.stats.skipped} unreadable image(s) skipped, e.g. {'; '.join(stream.stats.examples[:2])}")
    if lpips_model is None:
        warnings.append("LPIPS skipped (--no-lpips)")
    if extractor is None:
        warnings.append("reconstruction FID skipped (--no-fid)")
    for w in warnings:
        progress({"event": "warn", "message": w})
    return {
        REPORT_MARKER: "eval",
        "metrics": ["recon"],
        "results": results,
        "checkpoint": {"path": meta["path"], "weights_sha256": meta.get("weights_sha256"), "step": meta.get("step"),
                       "uvq_version": meta.get("uvq_version")},
        "data": {"source": data, "split": split, "val_fraction": data_cfg.val_fraction, "img_size": img_size,
                 "stats": stream.stats.to_dict()},
        "lpips": {"net": lpips_net, "version": "0.1"} if lpips_net else None,
        "extractor": extractor.describe() if extractor is not None else None,
        "device": str(device),
        "uvq_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "warnings": warnings,
    }
