"""Nearest neighbours of samples in the training set by LPIPS (the paper's appendix C).

To show that the model does not memorise, each sample is shown next to the k training images
closest to it in LPIPS distance (Zhang et al. 2018):

    LPIPS(a, b) = sum_l  1/(H_l W_l)  sum_{h,w}  sum_c  w_lc (f_l(a) - f_l(b))^2_{c,h,w}

with f_l the unit-normalised (over channels) activations of trunk layer l and w_l LPIPS's
non-negative linear weights. Expanding the square,

    sum w (fa - fb)^2 = sum w fa^2 + sum w fb^2 - 2 sum (w fa) fb,

so the distance of every (sample, reference) pair is a matrix product of cached features. Each
reference image goes through the trunk once (the authors' code ran LPIPS on one pair at a time,
two trunk passes per pair). The fast mode ranks the reference by cheap downsampled pixels
first and computes LPIPS only for the best M per sample: much less trunk work, at the price of
missing a true LPIPS neighbour that the pixel distance ranks below M (its recall is measured
in tests/test_neighbours.py).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uvq import __version__
from uvq.data.sources import BadImage, decode_image, encoded_images, to_float
from uvq.evaluation.features import ImageSet, open_set
from uvq.files import atomic_path, atomic_write_json
from uvq.images import save_grid
from uvq.progress import ProgressFn, null_progress
from uvq.runtime import UserError, all_gather, batch_share, dist_info, on_main

MODES = ("exact", "fast")

# ---------------------------------------------------------------------------------------------
# LPIPS from cached trunk features
# ---------------------------------------------------------------------------------------------


class LPIPSFeatures:
    """Splits an `lpips.LPIPS` module into trunk features and a distance between feature sets.

    `embed(x)` for x [B,3,H,W] in [0,1] gives, per layer l, unit-normalised activations
    [B,C_l,H_l,W_l]; `distance(fa, fb)` gives the [A,B] LPIPS distances, equal to
    `lpips_model(a, b, normalize=True)` for every pair.
    """

    def __init__(self, lpips_model: nn.Module) -> None:
        if getattr(lpips_model, "spatial", False) or not getattr(lpips_model, "lpips", True):
            raise ValueError("neighbours need an lpips.LPIPS with linear layers and spatial=False")
        self.model = lpips_model.eval()
        # NetLinLayer is (Dropout, 1x1 Conv without bias); in eval mode it is a weighted channel sum
        self.weights = [next(m for m in lin.modules() if isinstance(m, nn.Conv2d)).weight.detach().flatten()
                        for lin in lpips_model.lins]  # [C_l] per layer

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        import lpips

        x = self.model.scaling_layer(x.to(self.device).float() * 2.0 - 1.0)  # [0,1] -> [-1,1] -> scaled
        return [lpips.normalize_tensor(f) for f in self.model.net(x)]  # L x [B,C_l,H_l,W_l]

    @torch.no_grad()
    def distance(self, fa: Sequence[torch.Tensor], fb: Sequence[torch.Tensor]) -> torch.Tensor:
        total = None
        for a, b, w in zip(fa, fb, self.weights, strict=True):
            hw = a.shape[2] * a.shape[3]
            wa = (a * w[None, :, None, None]).flatten(1)  # [A, C*H*W]
            aa = (wa * a.flatten(1)).sum(1)  # [A]
            bb = (b * b * w[None, :, None, None]).flatten(1).sum(1)  # [B]
            d = (aa[:, None] + bb[None, :] - 2.0 * (wa @ b.flatten(1).T)) / hw  # [A, B]
            total = d if total is None else total + d
        return total.clamp_min_(0.0)


def _feature_bytes(lp: LPIPSFeatures, size: int) -> int:
    with torch.no_grad():
        return sum(f.numel() * 4 for f in lp.embed(torch.zeros(1, 3, size, size, device=lp.device)))


# ---------------------------------------------------------------------------------------------
# Reading the images at one size (the sample size), as the training data is prepared
# ---------------------------------------------------------------------------------------------


def _decoded(image_set: ImageSet, size: int, indices: Sequence[int] | None, bad: list[str]):
    """(index, float [3,size,size] in [0,1]) of the readable images (all, or `indices`), decoded
    as the training data is (uvq.data.sources.decode_image); unreadable keys go to `bad`."""
    for i, key, _origin, data in encoded_images(image_set.reader, None if indices is None else set(indices)):
        try:
            yield i, to_float(decode_image(data, size))
        except BadImage:
            bad.append(key)


def _load_all(image_set: ImageSet, size: int, indices: Sequence[int] | None = None) -> tuple[list[int], torch.Tensor, list[str]]:
    """Decode (a subset of) a set: kept indices, images [n,3,size,size], unreadable keys."""
    kept, images, bad = [], [], []
    for i, x in _decoded(image_set, size, indices, bad):
        kept.append(i)
        images.append(x)
    return kept, (torch.stack(images) if images else torch.zeros(0, 3, size, size)), bad


def _stream(image_set: ImageSet, size: int, batch: int, bad: list[str], indices: Sequence[int] | None = None):
    """Yield (indices, images [b,3,size,size]) over the whole set (or `indices`), skipping unreadable files."""
    idx, imgs = [], []
    for i, x in _decoded(image_set, size, indices, bad):
        idx.append(i)
        imgs.append(x)
        if len(idx) == batch:
            yield torch.tensor(idx), torch.stack(imgs)
            idx, imgs = [], []
    if idx:
        yield torch.tensor(idx), torch.stack(imgs)


def _merge_topk(best_d: torch.Tensor, best_i: torch.Tensor, d: torch.Tensor, idx: torch.Tensor, k: int):
    """Keep the k smallest of the running best [S,k] and a new block [S,b] (index order breaks ties)."""
    all_d = torch.cat([best_d, d], dim=1)
    all_i = torch.cat([best_i, idx.to(best_i.device)[None, :].expand(d.shape[0], -1)], dim=1)
    return _smallest_k(all_d, all_i, k)


def _smallest_k(all_d: torch.Tensor, all_i: torch.Tensor, k: int):
    """The k smallest distances of each row of [S,m] candidates with their indices (ties: lower index)."""
    order = torch.argsort(all_i, dim=1, stable=True)  # ties in distance go to the lower index
    all_d, all_i = all_d.gather(1, order), all_i.gather(1, order)
    top = torch.sort(all_d, dim=1, stable=True).indices[:, :k]
    return all_d.gather(1, top), all_i.gather(1, top)


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def find_neighbours(samples: torch.Tensor, reference: ImageSet, lpips_model: nn.Module, *, k: int = 10,
                    mode: str = "exact", prefilter: int = 100, batch_size: int = 16, pixel_size: int = 16,
                    memory_bytes: int = 2 << 30, progress: ProgressFn | None = None) -> dict[str, Any]:
    """For each sample [S,3,H,W] in [0,1], the k nearest images of `reference` by LPIPS.

    Reference images are decoded at the samples' size (uvq.data.sources's resize and centre crop).
    exact: every reference image passes the trunk once, in batches of `batch_size`, and is
    compared with all samples at once. fast: rank by `pixel_size`^2 average-pooled pixels, keep
    the best `prefilter` per sample, and rank those by LPIPS. Sample features are kept for the
    whole pass when they fit in `memory_bytes`, else samples are taken in groups (the reference
    is then read once per group). Returns {"distances": [S,k], "indices": [S,k] into
    reference.keys, "unreadable": [...], "groups": int}.
    """
    progress = progress or null_progress
    if mode not in MODES:
        raise UserError(f"unknown neighbours mode {mode!r}; valid: {', '.join(MODES)}")
    n_ref, s, size = len(reference.keys), samples.shape[0], samples.shape[-1]
    if k < 1 or k > n_ref:
        raise UserError(f"--k {k} asks for more neighbours than the reference's {n_ref} images; lower --k")
    if mode == "fast" and prefilter < k:
        raise UserError(f"--prefilter {prefilter} must be at least --k {k}")
    lp = LPIPSFeatures(lpips_model)
    per_image = _feature_bytes(lp, size)
    group = max(1, min(s, memory_bytes // per_image - batch_size))
    bad: list[str] = []
    if mode == "fast":
        return _fast(samples, reference, lp, k=k, prefilter=prefilter, batch_size=batch_size, pixel_size=pixel_size,
                     group=group, bad=bad, progress=progress)

    dist = torch.empty(s, k)
    index = torch.empty(s, k, dtype=torch.long)
    groups = range(0, s, group)
    # Under torchrun each rank searches a contiguous run of whole batches of the reference
    # (uvq.runtime.batch_share); the ranks' k best are then merged, with the same tie rule, into
    # the k best of the whole reference.
    info = dist_info()
    first, count = batch_share(n_ref, batch_size, info)
    share = range(first, first + count) if info.enabled else None
    progress({"event": "start", "task": "neighbours", "total": count * len(groups), "unit": "img"})
    for g in groups:
        rows = slice(g, min(g + group, s))
        fs = lp.embed(samples[rows])
        best_d = torch.full((rows.stop - rows.start, 0), float("inf"), device=lp.device)
        best_i = torch.zeros((rows.stop - rows.start, 0), dtype=torch.long, device=lp.device)
        bad.clear()
        for idx, images in _stream(reference, size, batch_size, bad, share) if count else ():
            d = lp.distance(fs, lp.embed(images))  # [S_g, b]
            best_d, best_i = _merge_topk(best_d, best_i, d, idx, k)
            progress({"event": "advance", "task": "neighbours", "n": len(idx), "metrics": {}})
        if info.enabled:
            parts = all_gather((best_d.cpu(), best_i.cpu(), list(bad)))
            best_d, best_i = _smallest_k(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), k)
            bad[:] = [key for p in parts for key in p[2]]
        if best_d.shape[1] < k:
            raise UserError(f"only {best_d.shape[1]} of the reference's {n_ref} images are readable; lower --k to at most that")
        dist[rows], index[rows] = best_d.cpu(), best_i.cpu()
    progress({"event": "end", "task": "neighbours"})
    return {"distances": dist, "indices": index, "unreadable": list(bad), "groups": len(groups)}


def _fast(samples, reference, lp, *, k, prefilter, batch_size, pixel_size, group, bad, progress):
    """Pixel pre-filter to `prefilter` candidates per sample, then exact LPIPS on those alone."""
    s, size = samples.shape[0], samples.shape[-1]
    pool = min(pixel_size, size)
    cheap_s = F.adaptive_avg_pool2d(samples.float(), pool).flatten(1)  # [S, 3*p*p]
    m = min(prefilter, len(reference.keys))
    best_d = torch.full((s, 0), float("inf"))
    best_i = torch.zeros((s, 0), dtype=torch.long)
    progress({"event": "start", "task": "neighbours prefilter", "total": len(reference.keys), "unit": "img"})
    for idx, images in _stream(reference, size, max(batch_size, 64), bad):
        cheap_r = F.adaptive_avg_pool2d(images, pool).flatten(1)  # [b, 3*p*p]
        best_d, best_i = _merge_topk(best_d, best_i, torch.cdist(cheap_s, cheap_r).pow(2), idx, m)
        progress({"event": "advance", "task": "neighbours prefilter", "n": len(idx), "metrics": {}})
    progress({"event": "end", "task": "neighbours prefilter"})
    if best_d.shape[1] < k:
        raise UserError(f"only {best_d.shape[1]} of the reference's {len(reference.keys)} images are readable; lower --k")

    # LPIPS for the union of candidates: each candidate passes the trunk once.
    cand = sorted(set(best_i.flatten().tolist()))
    position = {c: p for p, c in enumerate(cand)}
    progress({"event": "start", "task": "neighbours rerank", "total": len(cand), "unit": "img"})
    full = torch.full((s, len(cand)), float("inf"))
    held = lp.embed(samples) if group >= s else None  # sample features, when they fit
    block = max(batch_size, 256)  # candidates decoded per read of the reference
    for c0 in range(0, len(cand), block):
        _, images, _ = _load_all(reference, size, cand[c0:c0 + block])
        for b0 in range(0, images.shape[0], batch_size):
            fr = lp.embed(images[b0:b0 + batch_size])
            cols = slice(c0 + b0, c0 + b0 + fr[0].shape[0])
            for g in range(0, s, group):
                fs = held if held is not None else lp.embed(samples[g:g + group])
                full[g:g + group, cols] = lp.distance(fs, fr).cpu()
            progress({"event": "advance", "task": "neighbours rerank", "n": fr[0].shape[0], "metrics": {}})
    progress({"event": "end", "task": "neighbours rerank"})
    cols = torch.tensor([[position[c] for c in row] for row in best_i.tolist()])  # [S, m]
    own = full.gather(1, cols)  # each sample ranks its own candidates only
    order = torch.argsort(best_i, dim=1, stable=True)  # ties in distance go to the lower index
    own, cand_i = own.gather(1, order), best_i.gather(1, order)
    top = torch.sort(own, dim=1, stable=True).indices[:, :k]
    dist, index = own.gather(1, top), cand_i.gather(1, top)
    return {"distances": dist, "indices": index, "unreadable": list(bad), "groups": -(-s // group),
            "candidates": len(cand)}


# ---------------------------------------------------------------------------------------------
# The command's library function: search, then write the grid, the CSV and the report
# ---------------------------------------------------------------------------------------------


def load_samples(image_set: ImageSet, progress: ProgressFn | None = None) -> tuple[torch.Tensor, list[str], list[str]]:
    """The sample images at one size (the first readable sample's, square-cropped), their keys,
    and the keys of unreadable files."""
    first = None
    for _i, _key, _origin, data in encoded_images(image_set.reader):
        try:
            arr = decode_image(data, None)  # uint8 [3,H,W]
        except BadImage:
            continue
        first = min(arr.shape[1], arr.shape[2])
        break
    if first is None:
        raise UserError(f"samples {image_set.source}: no readable image")
    kept, images, bad = _load_all(image_set, first)
    return images, [image_set.keys[i] for i in kept], bad


def neighbours(samples: str | Path, reference: str | Path, out_dir: str | Path, *, lpips_model: nn.Module,
               lpips_name: str = "vgg", k: int = 10, mode: str = "exact", prefilter: int = 100,
               batch_size: int = 16, device: torch.device | str = "cpu", max_samples: int | None = None,
               progress: ProgressFn | None = None) -> dict[str, Any]:
    """`uvq neighbours`: write neighbours.png (each row: a sample, then its k neighbours),
    neighbours.csv (sample, rank, reference key, distance) and neighbours.json to `out_dir`
    (which the caller has prepared). Returns the report."""
    progress = progress or null_progress
    sample_set = open_set(samples, role="samples", progress=progress)
    ref_set = open_set(reference, role="reference", progress=progress)
    if not sample_set.is_images or not ref_set.is_images:
        raise UserError("neighbours compare images: pass image folders, `uvq sample` directories or webdataset shards")
    images, keys, bad_samples = load_samples(sample_set, progress)
    if max_samples is not None:
        images, keys = images[:max_samples], keys[:max_samples]
    warnings = []
    if bad_samples:
        warnings.append(f"samples: {len(bad_samples)} unreadable file(s) skipped, e.g. {', '.join(bad_samples[:3])}")
    lpips_model = lpips_model.to(device)
    t0 = time.time()
    found = find_neighbours(images, ref_set, lpips_model, k=k, mode=mode, prefilter=prefilter,
                            batch_size=batch_size, progress=progress)
    seconds = time.time() - t0
    if found["unreadable"]:
        warnings.append(f"reference: {len(found['unreadable'])} unreadable file(s) skipped, "
                        f"e.g. {', '.join(found['unreadable'][:3])}")
    if found.get("groups", 1) > 1:
        warnings.append(f"sample features did not fit in memory together: samples were taken in {found['groups']} groups"
                        + (", each reading the whole reference" if mode == "exact" else ""))
    for w in warnings:
        progress({"event": "warn", "message": w})

    def write() -> dict[str, Any]:
        """The grid, the CSV and the report (rank 0 only under torchrun)."""
        out = Path(out_dir)
        size = images.shape[-1]
        flat = sorted(set(found["indices"].flatten().tolist()))
        kept, ref_images, _ = _load_all(ref_set, size, flat)
        by_index = dict(zip(kept, ref_images, strict=True))
        rows = []
        for i in range(images.shape[0]):
            rows.append(images[i])
            rows.extend(by_index[j] for j in found["indices"][i].tolist())
        save_grid(torch.stack(rows), out / "neighbours.png", nrow=k + 1)
        with atomic_path(out / "neighbours.csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["sample", "rank", "reference", "distance"])
            for i, key in enumerate(keys):
                for rank, (j, d) in enumerate(zip(found["indices"][i].tolist(), found["distances"][i].tolist(), strict=True), 1):
                    writer.writerow([key, rank, ref_set.keys[j], f"{d:.6f}"])
        report = {
            "uvq_report": "neighbours",
            "mode": mode, "k": k, "prefilter": prefilter if mode == "fast" else None,
            "lpips": {"net": lpips_name, "version": "0.1"},
            "samples": {**sample_set.describe(), "n_images": len(keys), "size": f"{size}x{size}"},
            "reference": {**ref_set.describe(), "n_images": len(ref_set.keys) - len(found["unreadable"]),
                          "resized_to": f"{size}x{size}"},
            "neighbours": [{"sample": key, "reference": [ref_set.keys[j] for j in found["indices"][i].tolist()],
                            "distance": [round(d, 6) for d in found["distances"][i].tolist()]}
                           for i, key in enumerate(keys)],
            "files": {"grid": str(out / "neighbours.png"), "csv": str(out / "neighbours.csv")},
            "seconds": round(seconds, 3), "device": str(device), "uvq_version": __version__, "warnings": warnings,
        }
        if mode == "fast":
            report["lpips_evaluated"] = found["candidates"]
        atomic_write_json(out / "neighbours.json", report)
        return report

    return on_main(write)
