"""Evaluation (docs/method.md section 6): FID/KID, PRDC, set-metric reports, reconstructions.

The paper evaluates samples with 2048-d InceptionV3 pool features (torch-fidelity's
`inception-v3-compat` extractor) over 50k samples against the training set: FID, and the
precision / recall / density / coverage of Naeem et al. (2020) with the official code's
nearest_k = 3. The VQGAN is judged by the FID of its reconstructions (Table 5).

The sets and their features (content hashing, the extractor, the cache) are in uvq.evaluation.features.
This module reads top to bottom: the metrics on features, then the reports and the
reconstruction metrics of stage one.
"""

from __future__ import annotations

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

