"""Evaluation (method section 6): FID/KID, PRDC, set-metric reports, reconstructions.

The paper evaluates samples with 2048-d InceptionV3 pool features (torch-fidelity's
`inception-v3-compat` extractor) over 50k samples against the training set: FID, and the
precision / recall / density / coverage of Naeem et al. (2020) with the official code's
nearest_k = 3. The VQGAN is judged by the FID of its reconstructions (Table 5).

The sets and their features (content hashing, the extractor, the cache) are in uvq.evaluation.features.
This module reads top to bottom: the metrics on features, then the reports and the
reconstruction metrics of stage one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uvq import __version__
from uvq.evaluation.features import (
    ImageSet,
    InceptionFeatures,
    extract_features,
    feature_statistics,
    open_set,
    set_warnings,
)
from uvq.files import atomic_write_json
from uvq.progress import ProgressFn, null_progress
from uvq.runtime import UserError

REPORT_MARKER = "uvq_report"  # every report we write carries it; files without it are not ours

# ---------------------------------------------------------------------------------------------
# FID and KID (through torch-fidelity's own functions)
# ---------------------------------------------------------------------------------------------
#
# The mean and covariance of a set's features (`feature_statistics`) are computed with the
# set, in uvq.evaluation.features.


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Fréchet distance of two Gaussians.

    torch-fidelity's own form: the trace of the matrix square root as the sum of square roots of
    the eigenvalues of S1 S2.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    s1 = {"mu": np.asarray(mu1, np.float64), "sigma": np.asarray(sigma1, np.float64)}
    s2 = {"mu": np.asarray(mu2, np.float64), "sigma": np.asarray(sigma2, np.float64)}
    if s1["mu"].shape != s2["mu"].shape:
        raise UserError(f"FID of features of different dimensions: {s1['mu'].shape[0]} and {s2['mu'].shape[0]}")
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> dict[str, Any]:
    """Unbiased MMD^2 with the cubic polynomial kernel over random subsets (Binkowski et al. 2018).

    torch-fidelity's defaults (100 subsets of 1000); the subset size shrinks to the smaller set.
    """
    from torch_fidelity.metric_kid import (
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        kid_features_to_metric,
    )

    size = min(subset_size, len(f1), len(f2))
    if size < 2:
        raise UserError(f"KID needs at least 2 images per set; got {len(f1)} and {len(f2)}")
    out = kid_features_to_metric(torch.from_numpy(np.ascontiguousarray(f1)), torch.from_numpy(np.ascontiguousarray(f2)),
                                 kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return {"kid": float(out[KEY_METRIC_KID_MEAN]), "kid_std": float(out[KEY_METRIC_KID_STD]),
            "kid_subsets": subsets, "kid_subset_size": size}


# ---------------------------------------------------------------------------------------------
# Precision, recall, density, coverage (Naeem et al. 2020), in bounded memory
# ---------------------------------------------------------------------------------------------
#
# With r_i the distance from real i to its k-th nearest other real (prdc: the (k+1)-th
# smallest including itself) and s_j likewise among the fakes:
#   precision = mean_j [exists i: d(i,j) < r_i]      density  = mean_j (1/k) #{i: d(i,j) < r_i}
#   recall    = mean_i [exists j: d(i,j) < s_j]      coverage = mean_i [exists j: d(i,j) < r_i]
# Distances are computed a block of rows at a time (never an N x N matrix) as
# |x|^2 + |y|^2 - 2 x.y in float32 on centred features, and every comparison whose float32
# margin is within the rounding bound is recomputed exactly in float64, so the result equals
# exact arithmetic (and the `prdc` package, which works on float64-accurate sklearn distances).


def _tolerance(dim: int) -> float:
    # Relative rounding bound of the float32 expansion, as a fraction of |x|^2 + |y|^2. Measured
    # errors are ~2e-7 at D=2048; this keeps a margin of about 200x.
    return 1e-6 * max(8.0, math.sqrt(dim))


class _Blocks:
    """Features held once: centred float32 copies for the fast pass, originals for exact checks."""

    def __init__(self, x: torch.Tensor, mean: torch.Tensor, device: torch.device) -> None:
        self.exact = x  # [N, D] original values (float32 or float64), on the device
        # a float32 mean shifts both sets alike, so distances keep only the subtraction's rounding
        self.fast = x.float() - mean.float()  # [N, D]
        self.sq = self.fast.pow(2).sum(1)  # [N]

    def __len__(self) -> int:
        return self.fast.shape[0]


def _sqdist(a: _Blocks, rows: slice, b: _Blocks) -> torch.Tensor:
    """Approximate squared distances [c, Nb] from rows of `a` to all of `b` (float32)."""
    d = a.sq[rows, None] + b.sq[None, :] - 2.0 * (a.fast[rows] @ b.fast.T)
    return d.clamp_min_(0.0)


def _exact_pairs(a: _Blocks, ia: torch.Tensor, b: _Blocks, ib: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Exact squared distances (float64) for the index pairs (ia[n], ib[n])."""
    out = torch.empty(ia.shape[0], dtype=torch.float64, device=ia.device)
    for s in range(0, ia.shape[0], chunk):
        diff = a.exact[ia[s:s + chunk]].double() - b.exact[ib[s:s + chunk]].double()  # [n, D]
        out[s:s + chunk] = diff.pow(2).sum(1)
    return out


def _less(d: torch.Tensor, thresh: torch.Tensor, tol: torch.Tensor, a: _Blocks, rows: slice, b: _Blocks) -> torch.Tensor:
    """[c, Nb] booleans d_exact(row, col) < thresh, with `thresh` exact float64 squared radii.

    Decided in float32 where the margin exceeds `tol`; the rest recomputed exactly.
    """
    t32 = thresh.float()
    less = d < t32
    unsure = (d - t32).abs_() <= tol
    if unsure.any():
        r, c = unsure.nonzero(as_tuple=True)
        exact = _exact_pairs(a, r + rows.start, b, c)
        t = thresh.expand_as(d)[r, c]
        less[r, c] = exact < t
    return less


def _kth_radii(x: _Blocks, k: int, chunk: int, tol_rel: float, progress: ProgressFn, task: str) -> torch.Tensor:
    """Exact squared distance from each point to its k-th nearest other point ([N] float64)."""
    n = len(x)
    radii = torch.empty(n, dtype=torch.float64, device=x.fast.device)
    sq_max = x.sq.max()
    for s in range(0, n, chunk):
        rows = slice(s, min(s + chunk, n))
        idx = torch.arange(rows.start, rows.stop, device=x.fast.device)
        d = _sqdist(x, rows, x)  # [c, N]
        d[idx - s, idx] = 0.0  # the point itself, at distance exactly 0 as in prdc
        tol = tol_rel * (x.sq[rows] + sq_max)  # [c]
        todo = torch.arange(rows.stop - rows.start, device=d.device)
        m = min(n, k + 9)
        while todo.numel():
            rows_left = d if todo.numel() == d.shape[0] else d[todo]  # no copy on the first round
            vals, cand = rows_left.topk(m, dim=1, largest=False)  # [t, m], ascending
            # Every float32 value is within t of its exact value, so the exact (k+1)-th smallest
            # lies within t of the float32 one, v. Candidates below v - 2t are surely nearer,
            # those above v + 2t surely farther; only the window between needs exact distances.
            t = tol[todo, None]  # [t, 1]
            v = vals[:, k:k + 1]
            below = (vals < v - 2 * t).sum(1)  # [t]
            window = (vals >= v - 2 * t) & (vals <= v + 2 * t)  # [t, m]
            # Certified when every point left out (float32 >= the m-th) is surely farther.
            done = (m == n) | (vals[:, -1:] > v + 2 * t).squeeze(1)
            r_i, c_i = window.nonzero(as_tuple=True)
            exact = torch.full(vals.shape, math.inf, dtype=torch.float64, device=d.device)
            exact[r_i, c_i] = _exact_pairs(x, todo[r_i] + s, x, cand[r_i, c_i])
            exact = exact.sort(dim=1).values  # window distances first, then +inf
            r = exact.gather(1, (k - below)[:, None]).squeeze(1)  # the (k+1)-th smallest, itself included
            radii[todo[done] + s] = r[done]
            todo = todo[~done]
            m = min(n, 2 * m)
        progress({"event": "advance", "task": task, "n": rows.stop - rows.start, "metrics": {}})
    return radii


def compute_prdc(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 5, *,
                 chunk_size: int | None = None, device: torch.device | str = "cpu",
                 memory_bytes: int = 256 << 20, progress: ProgressFn | None = None) -> dict[str, float]:
    """Precision, recall, density and coverage of `fake` [M, D] against `real` [N, D].

    Equal to `prdc.compute_prdc(real, fake, nearest_k=k)`. Peak memory is the features plus one
    [chunk, max(N, M)] block: `chunk_size` rows at a time, by default as many as fit in
    `memory_bytes` (about 18 bytes per block entry).
    """
    progress = progress or null_progress
    device = torch.device(device)
    real_t = torch.as_tensor(np.asarray(real) if not torch.is_tensor(real) else real).to(device)
    fake_t = torch.as_tensor(np.asarray(fake) if not torch.is_tensor(fake) else fake).to(device)
    if real_t.ndim != 2 or fake_t.ndim != 2 or real_t.shape[1] != fake_t.shape[1]:
        raise UserError(f"PRDC needs features [N, D] of one dimension; got {tuple(real_t.shape)} and {tuple(fake_t.shape)}")
    n, m = real_t.shape[0], fake_t.shape[0]
    if k < 1 or k >= min(n, m):
        raise UserError(f"PRDC's k={k} needs more than k images in each set (reference {n}, samples {m}); lower --k or add images")
    chunk = chunk_size or max(1, memory_bytes // (18 * max(n, m)))
    tol_rel = _tolerance(real_t.shape[1])

    # Centre both sets on the real mean: distances are unchanged and the float32 expansion
    # loses far less to cancellation. TF32 would break the rounding bound, so it is off here.
    mean = real_t.double().mean(0)
    x, y = _Blocks(real_t, mean, device), _Blocks(fake_t, mean, device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        progress({"event": "start", "task": "prdc", "total": n + 2 * m, "unit": "rows"})
        r_real = _kth_radii(x, k, chunk, tol_rel, progress, "prdc")
        r_fake = _kth_radii(y, k, chunk, tol_rel, progress, "prdc")
        precision = torch.zeros(m, dtype=torch.bool, device=device)
        density = torch.zeros(m, dtype=torch.int64, device=device)
        recall = torch.zeros(n, dtype=torch.bool, device=device)
        coverage = torch.zeros(n, dtype=torch.bool, device=device)
        x_sq_max = x.sq.max()
        for s in range(0, m, chunk):
            rows = slice(s, min(s + chunk, m))
            d = _sqdist(y, rows, x)  # [c, N]: fakes of this block against every real
            tol = (tol_rel * (y.sq[rows] + x_sq_max))[:, None]  # [c, 1]
            inside_real = _less(d, r_real[None, :], tol, y, rows, x)  # d(i,j) < r_i
            precision[rows] = inside_real.any(1)
            density[rows] = inside_real.sum(1)
            coverage |= inside_real.any(0)
            del inside_real
            recall |= _less(d, r_fake[rows, None], tol, y, rows, x).any(0)  # d(i,j) < s_j
            progress({"event": "advance", "task": "prdc", "n": rows.stop - rows.start, "metrics": {}})
        progress({"event": "end", "task": "prdc"})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"precision": precision.double().mean().item(), "recall": recall.double().mean().item(),
            "density": density.double().mean().item() / k, "coverage": coverage.double().mean().item()}


# ---------------------------------------------------------------------------------------------
# Metrics over two sets, with a provenance report
# ---------------------------------------------------------------------------------------------

SET_METRICS = ("fid", "kid", "prdc")


def _build_extractor(cfg_eval, device: torch.device) -> InceptionFeatures:
    from uvq.registry import registry

    return registry.get("feature_extractors", cfg_eval.feature_extractor)(cfg_eval, device)


def _is_feature_file(src: str | Path | ImageSet) -> bool:
    if isinstance(src, ImageSet):
        return not src.is_images
    return Path(str(src)).suffix.lower() in (".npy", ".npz", ".safetensors") and Path(str(src)).is_file()


def evaluate_metrics(metrics: Sequence[str], samples: str | Path | ImageSet, reference: str | Path | ImageSet, *,
                     cfg_eval, device: torch.device | str = "cpu", progress: ProgressFn | None = None,
                     seed: int = 0, cache_dir: str | Path | None = None,
                     extractor: InceptionFeatures | None = None) -> dict[str, Any]:
    """FID / KID / PRDC of `samples` against `reference`: the report, with full provenance.

    `cfg_eval` is an `EvalConfig` (feature extractor, k, batch size, Inception weights). The
    extractor is built only when a set is images. Returns {"results": {...}, "samples": info,
    "reference": info, "extractor": ..., "warnings": [...], ...}.
    """
    progress = progress or null_progress
    device = torch.device(device)
    bad = [m for m in metrics if m not in SET_METRICS]
    if bad or not metrics:
        raise UserError(f"unknown set metric(s) {bad or metrics}; valid: {', '.join(SET_METRICS)}")
    # Build the extractor first, so that missing weights fail before any set is read.
    if extractor is None and not all(_is_feature_file(src) for src in (samples, reference)):
        extractor = _build_extractor(cfg_eval, device)
    sets = {role: src if isinstance(src, ImageSet) else open_set(src, role=role, progress=progress)
            for role, src in (("samples", samples), ("reference", reference))}
    if sets["samples"].kind == "stats":
        raise UserError("samples must be images or a features file; a statistics file can only be a FID reference")
    if sets["reference"].kind == "stats" and {"kid", "prdc"} & set(metrics):
        raise UserError(f"reference {sets['reference'].source} holds only mu/sigma: it serves FID alone; "
                        "pass images or a features file for kid/prdc")
    feats = {role: extract_features(s, extractor, batch_size=cfg_eval.batch_size, cache_dir=cache_dir, role=role,
                                    progress=progress) for role, s in sets.items()}
    dims = {f.info["dim"] for f in feats.values()}
    if len(dims) > 1:
        raise UserError(f"samples and reference features differ in dimension ({sorted(dims)}); use one extractor for both")

    warnings = [w for role, f in feats.items() for w in set_warnings(role, f.info)]
    sizes = {role: set(f.info.get("sizes", {})) for role, f in feats.items()}
    if sizes["samples"] and sizes["reference"] and sizes["samples"] != sizes["reference"]:
        warnings.append(f"samples ({', '.join(sorted(sizes['samples']))}) and reference ({', '.join(sorted(sizes['reference']))}) "
                        "differ in image size; both are resized for the extractor")
    for w in warnings:
        progress({"event": "warn", "message": w})

    results: dict[str, Any] = {}
    s, r = feats["samples"], feats["reference"]
    if "fid" in metrics:
        results["fid"] = frechet_distance(*s.statistics(), *r.statistics())
    if "kid" in metrics:
        results.update(kernel_inception_distance(s.features, r.features, seed=seed))
    if "prdc" in metrics:
        results.update(compute_prdc(r.features, s.features, cfg_eval.k, device=device, progress=progress))
        results["k"] = cfg_eval.k
    return {
        REPORT_MARKER: "eval",
        "metrics": list(metrics),
        "results": results,
        "samples": s.info,
        "reference": r.info,
        "extractor": extractor.describe() if extractor is not None else None,
        "seed": seed,
        "device": str(device),
        "uvq_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "warnings": warnings,
    }


def default_report_path(samples: str | Path, name: str) -> Path:
    """Beside the samples: DIR/eval-<name>.json for a folder, else next to the file or shards."""
    path = Path(str(samples))
    if path.is_dir():
        return path / f"eval-{name}.json"
    parent = path.parent if path.parent.is_dir() else Path.cwd()
    return parent / f"eval-{name}.json"


def write_report(report: dict[str, Any], path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a report atomically; an existing file that is not one of our reports needs `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        try:
            ours = REPORT_MARKER in json.loads(path.read_text())
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise UserError(f"{path} exists and is not a uvq report; pass --overwrite to replace it or choose another --out")
    atomic_write_json(path, report)
    return path


# ---------------------------------------------------------------------------------------------
# Stage one: reconstruction quality of the VQGAN (Table 5)
# ---------------------------------------------------------------------------------------------


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0,1]: 10 log10(1 / MSE). [B,3,H,W] x2 -> [B]."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


def codebook_usage(counts: torch.Tensor) -> dict[str, Any]:
    """Codes used and the perplexity exp(H(p)) of the empirical code distribution p = counts / sum."""
    counts = counts.double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codes_used": int((counts > 0).sum()), "codebook_size": int(counts.numel()),
            "perplexity": float(entropy.exp())}


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

        save_grid(pairs.flatten(0, 1), grid_path, nrow=pairs.shape[1])
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
    from uvq.data.sources import iterate_images

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
