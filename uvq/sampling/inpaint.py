"""Inpainting, editing and outpainting (docs/method.md section 5; paper section 4.5).

An image is fitted to the VQGAN's size and encoded to codes. The region to regenerate (a mask
PNG, white = regenerate, or boxes) is mapped to a latent mask: a latent is masked when its
receptive patch (downsample x downsample pixels) overlaps the region. Those latents are set to
the mask id, and the same chain as `uvq sample` runs from

    t_start = round(T * n_masked / N)                                     (docs/method.md section 5)

the time at which that many masks are expected, where T is the step budget of a full chain and
N the number of tokens. Only masked positions are revealed; known tokens never change. The
decoded image may be composited with the original pixels outside the region.

Outpainting grows the canvas: the encoded image sits inside a larger token grid whose border is
masked, and the window mixture of uvq.sampling.canvas (Eq. 8) predicts it when the grid is larger than
the training window.

Layers, top to bottom:
    regions          boxes, mask PNGs, --extend
    fitting          resize (short side) and center-crop to the VQGAN's size, for image and mask
    latent masks     pixel region -> latent mask, dilation, start time
    compositing      feathered paste of the generated region into the original pixels
    inpaint_tokens   the chain on a partly known token grid (uvq.sampling.canvas.sample_canvas)
    inpaint_images   the library function behind `uvq inpaint`
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from uvq.data.sources import IMAGE_EXTS, BadImage, is_image_name, open_image, resize_center_crop
from uvq.images import save_grid, save_png, to_rgb
from uvq.prior.absorbing import start_time_for_masked
from uvq.prior.autoregressive import refuse_autoregressive
from uvq.progress import ProgressFn, null_progress
from uvq.runtime import UserError
from uvq.sampling.canvas import (
    CanvasStats,
    check_memory,
    decode_canvas,
    make_windows,
    parse_window_choice,
    sample_canvas,
)
from uvq.sampling.chain import DEFAULT_SAMPLER, bind_sampler, check_temp

SIDES = ("left", "right", "top", "bottom")

# ---------------------------------------------------------------------------------------------
# Regions: boxes, mask PNGs, --extend
# ---------------------------------------------------------------------------------------------


def parse_box(spec: str) -> tuple[int, int, int, int]:
    """'x0,y0,x1,y1' -> ints. Pixel coordinates, x0/y0 inclusive, x1/y1 exclusive (as PIL's crop)."""
    parts = [p.strip() for p in str(spec).split(",")]
    if len(parts) != 4 or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        raise UserError(f"--box {spec!r} is not x0,y0,x1,y1 in pixels (for example 8,8,24,20)")
    x0, y0, x1, y1 = (int(p) for p in parts)
    return x0, y0, x1, y1


def box_mask(boxes: list[tuple[int, int, int, int]], height: int, width: int, name: str = "the image") -> torch.Tensor:
    """BoolTensor[H, W], True inside any box. A box must lie inside the image and be non-empty."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise UserError(f"--box {x0},{y0},{x1},{y1} is empty or lies outside {name} ({width}x{height} pixels); "
                            f"a box needs 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")
        mask[y0:y1, x0:x1] = True
    return mask


def load_mask(path: str | Path, height: int, width: int, name: str = "the image") -> torch.Tensor:
    """A mask PNG -> BoolTensor[H, W]: white (luminance > 127) = regenerate. Must match the image."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"mask {path} does not exist; give a PNG the size of {name}, white = regenerate")
    try:
        with Image.open(path) as im:
            im.load()
            gray = np.asarray(to_rgb(im).convert("L"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"mask {path} is not a readable image ({type(exc).__name__}); give a PNG") from exc
    if gray.shape != (height, width):
        raise UserError(f"mask {path} is {gray.shape[1]}x{gray.shape[0]} pixels but {name} is {width}x{height}; "
                        "make the mask the size of the image (white = regenerate)")
    mask = torch.from_numpy(gray > 127)
    if not bool(mask.any()):
        raise UserError(f"mask {path} has no white pixels, so there is nothing to regenerate; paint the region "
                        "to regenerate white")
    return mask


def parse_extend(spec: str | None, downsample: int) -> dict[str, int]:
    """'left=64,right=64' -> {left, right, top, bottom} in pixels, each a multiple of `downsample`."""
    out = dict.fromkeys(SIDES, 0)
    if not spec:
        return out
    for part in str(spec).split(","):
        m = re.fullmatch(r"\s*(left|right|top|bottom)\s*=\s*(\d+)\s*", part)
        if not m:
            raise UserError(f"--extend {spec!r} is not side=pixels,... with sides left, right, top, bottom "
                            "(for example left=64,right=64)")
        px = int(m.group(2))
        if px % downsample:
            raise UserError(f"--extend {m.group(1)}={px} is not a multiple of the VQGAN's downsampling factor "
                            f"{downsample}; use {px // downsample * downsample} or {(px // downsample + 1) * downsample}")
        out[m.group(1)] = px
    return out


# ---------------------------------------------------------------------------------------------
# Fitting an image (and its region) to the VQGAN's size
# ---------------------------------------------------------------------------------------------


def _overlap(n_out: int, n_in: int, scale: float, offset: int) -> torch.Tensor:
    """FloatTensor[n_out, n_in]: 1 where output pixel o (after resizing by `scale` and cropping at
    `offset`) and input pixel i overlap with positive length."""
    o = torch.arange(n_out, dtype=torch.float64)[:, None] + offset
    i = torch.arange(n_in, dtype=torch.float64)[None, :]
    lo, hi = o / scale, (o + 1) / scale  # the output pixel's footprint in input pixels
    return ((torch.minimum(hi, i + 1) - torch.maximum(lo, i)) > 1e-9).float()


def fit_to_size(image: Image.Image, region: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Resize the short side to `size` (bilinear) and center-crop to size x size: the official
    loaders' transform (uvq.data.sources.resize_center_crop).

    Returns (image FloatTensor[3, S, S] in [0,1], region BoolTensor[S, S], a note saying what was
    done). A pixel of the fitted region is set when its footprint in the original overlaps the
    original region, so a region never vanishes by resampling.
    """
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    fitted = resize_center_crop(image, size)
    pixels = torch.from_numpy(np.asarray(fitted, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255.0)
    a_h = _overlap(size, h, new_h / h, top)  # [S, H]
    a_w = _overlap(size, w, new_w / w, left)  # [S, W]
    fitted_region = (a_h @ region.float() @ a_w.T) > 0  # [S, S]
    if (w, h) == (size, size):
        note = f"{w}x{h}, the VQGAN's size: used as is"
    elif (new_w, new_h) == (w, h):
        note = f"{w}x{h} center-cropped to {size}x{size} (the VQGAN's size)"
    else:
        note = f"{w}x{h} resized to {new_w}x{new_h} (short side {size}) and center-cropped to {size}x{size} (the VQGAN's size)"
    return pixels, fitted_region, note


# ---------------------------------------------------------------------------------------------
# Pixel region -> latent mask, and the start time (docs/method.md section 5)
# ---------------------------------------------------------------------------------------------


def latent_mask(region: torch.Tensor, downsample: int) -> torch.Tensor:
    """BoolTensor[H, W] -> BoolTensor[H/f, W/f]: a latent is masked when any pixel of its f x f
    patch lies in the region."""
    h, w = region.shape
    if h % downsample or w % downsample:
        raise ValueError(f"region {h}x{w} is not a multiple of the downsampling factor {downsample}")
    return F.max_pool2d(region.float()[None, None], downsample)[0, 0] > 0  # [h, w]


def dilate(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Grow a BoolTensor[h, w] latent mask by k latents in every direction (a (2k+1)^2 square)."""
    if k < 0:
        raise UserError(f"--dilate must be >= 0 (got {k})")
    if k == 0:
        return mask.clone()
    return F.max_pool2d(mask.float()[None, None], 2 * k + 1, stride=1, padding=k)[0, 0] > 0


def start_time(n_masked: int, n_tokens: int, steps: int) -> int:
    """t_start = round(T * n_masked / N) with T = `steps`, at least 1 (one step reveals all)."""
    return max(1, start_time_for_masked(n_masked, n_tokens, steps))


# ---------------------------------------------------------------------------------------------
# Compositing
# ---------------------------------------------------------------------------------------------


def feather(region: torch.Tensor, px: int) -> torch.Tensor:
    """BoolTensor[H, W] -> alpha FloatTensor[H, W]: 1 in the region, falling linearly to 0 over
    `px` pixels outside it (Chebyshev distance), so the pasted edge blends in."""
    if px < 0:
        raise UserError(f"--feather must be >= 0 pixels (got {px})")
    m = region.float()[None, None]  # [1, 1, H, W]
    alpha = torch.zeros_like(m)
    for _ in range(px):  # mean of the region grown by 0..px-1 pixels: a linear ramp
        alpha += m
        m = F.max_pool2d(m, 3, stride=1, padding=1)
    return (alpha / px)[0, 0] if px else region.float()


def composite(original: torch.Tensor, generated: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """original * (1 - alpha) + generated * alpha; images [..., 3, H, W], alpha [H, W]."""
    return original * (1 - alpha) + generated * alpha


# ---------------------------------------------------------------------------------------------
# One input: the frame to fill, its known pixels and its region
# ---------------------------------------------------------------------------------------------


@dataclass
class EditJob:
    """One input prepared for editing, in the output frame (the image, grown by --extend)."""

    name: str  # the input's stem
    source: str  # the input's path
    pixels: torch.Tensor  # FloatTensor[3, S, S], the fitted image
    region: torch.Tensor  # BoolTensor[H', W'], pixels to regenerate in the output frame
    offset: tuple[int, int]  # (top, left) of the fitted image in the frame, in pixels
    frame: tuple[int, int]  # (H', W') pixels
    note: str
    extend: dict[str, int] = field(default_factory=dict)


def prepare_job(image_path: str | Path, *, size: int, downsample: int, mask_path: str | Path | None = None,
                boxes: list[tuple[int, int, int, int]] | None = None, extend: dict[str, int] | None = None) -> EditJob:
    """Read an image and its region (mask PNG and/or boxes, in the image's own pixels), fit both
    to the VQGAN's size, and grow the frame by `extend` pixels per side (the border is regenerated)."""
    image_path = Path(image_path)
    if not image_path.is_file():
        raise UserError(f"input image {image_path} does not exist")
    try:
        im = to_rgb(open_image(image_path))
    except BadImage as exc:
        raise UserError(f"input image {image_path} cannot be read: {exc}") from exc
    w, h = im.size
    name = f"image {image_path.name}"
    region = torch.zeros(h, w, dtype=torch.bool)
    if mask_path is not None:
        region |= load_mask(mask_path, h, w, name)
    if boxes:
        region |= box_mask(boxes, h, w, name)
    extend = extend or dict.fromkeys(SIDES, 0)
    grows = any(extend.values())
    if not bool(region.any()) and not grows:
        raise UserError(f"nothing to regenerate in {image_path}: give --mask, --masks, --box or --extend")
    pixels, fitted, note = fit_to_size(im, region, size)
    if bool(region.any()) and not bool(fitted.any()):
        raise UserError(f"the region of {image_path} lies outside the central {size}x{size} crop that the VQGAN "
                        "sees; move it toward the centre")
    top, left = extend["top"], extend["left"]
    frame = (size + top + extend["bottom"], size + left + extend["right"])
    full = torch.ones(frame, dtype=torch.bool)  # the border is regenerated
    full[top:top + size, left:left + size] = fitted
    if grows:
        note += "; grown by " + ", ".join(f"{s}={extend[s]}" for s in SIDES if extend[s]) + " pixels"
    return EditJob(name=image_path.stem, source=str(image_path), pixels=pixels, region=full, offset=(top, left),
                   frame=frame, note=note, extend=dict(extend))


def frame_pixels(job: EditJob, fill: float = 0.5) -> torch.Tensor:
    """The fitted image placed in the output frame, the border filled with grey: [3, H', W']."""
    out = torch.full((3, *job.frame), fill)
    top, left = job.offset
    s = job.pixels.shape[-1]
    out[:, top:top + s, left:left + s] = job.pixels
    return out


# ---------------------------------------------------------------------------------------------
# The chain on a partly known token grid
# ---------------------------------------------------------------------------------------------


@dataclass
class InpaintResult:
    tokens: torch.Tensor  # LongTensor[n, h', w'], the completions' codes
    known: torch.Tensor  # LongTensor[h', w'], the encoded input (mask id where nothing is known)
    mask: torch.Tensor  # BoolTensor[h', w'], the latents regenerated
    t_start: int
    steps: int


def inpaint_tokens(prior: torch.nn.Module, known: torch.Tensor, mask: torch.Tensor, *, n: int, steps: int | None = None,
                   temp: float = 0.9, seed: int = 0, sample_ids: torch.Tensor | None = None,
                   window: tuple[int, int] | None = None, **canvas_options: Any) -> InpaintResult:
    """n completions of a token grid: known LongTensor[h', w'], mask BoolTensor[h', w'] (True =
    regenerate) -> InpaintResult.

    The chain starts at t_start = round(T * n_masked / N) with T = `steps` (default N, the full
    chain) and N = h'*w' tokens, so the masked positions get the share of the step budget that a
    full chain would spend on that many masks. Completion j uses SampleRNG(seed, sample_ids[j])
    (default j). canvas_options go to uvq.sampling.canvas.sample_canvas (stride, windows, batch_windows,
    precision, progress, stats) for grids larger than the training window.
    """
    if known.shape != mask.shape or known.ndim != 2:
        raise ValueError("known and mask must both be [h', w']")
    n_tokens = known.numel()
    n_masked = int(mask.sum())
    if n_masked == 0:
        raise UserError("the region covers no latent, so there is nothing to regenerate; enlarge the region")
    steps = n_tokens if steps is None else int(steps)
    if not 1 <= steps <= n_tokens:
        raise UserError(f"--steps must be between 1 and the {n_tokens} tokens of the grid (got {steps})")
    if n < 1:
        raise UserError(f"-n must be >= 1 (got {n})")
    t0 = start_time(n_masked, n_tokens, steps)
    mask_id = int(prior.mask_id)
    x = torch.where(mask.to(known.device), torch.full_like(known, mask_id), known)  # [h', w']
    x = x[None].expand(n, -1, -1).contiguous()  # [n, h', w']
    ids = torch.arange(n) if sample_ids is None else torch.as_tensor(sample_ids)
    tokens = sample_canvas(prior, x, steps=steps, temp=temp, seed=seed, sample_ids=ids, window=window, t_start=t0,
                           **canvas_options)
    return InpaintResult(tokens=tokens, known=x[0], mask=mask, t_start=t0, steps=steps)


# ---------------------------------------------------------------------------------------------
# `uvq inpaint`: checkpoints and images in, completions, grids and provenance out
# ---------------------------------------------------------------------------------------------


def list_inputs(path: str | Path, *, mask: str | Path | None = None, masks: str | Path | None = None
                ) -> list[tuple[Path, Path | None]]:
    """The (image, mask) pairs of an input: one image, or a folder whose images each have a mask
    masks/<stem>.png when `masks` is given."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"input {path} does not exist; give an image or a folder of images")
    if path.is_file():
        if masks is not None:
            raise UserError("--masks DIR goes with a folder of images; for one image use --mask PNG")
        return [(path, Path(mask) if mask is not None else None)]
    if mask is not None:
        raise UserError(f"{path} is a folder: give one mask per image with --masks DIR (masks/<stem>.png), "
                        "not --mask")
    images = sorted(p for p in path.iterdir() if p.is_file() and is_image_name(p.name))
    if not images:
        raise UserError(f"folder {path} holds no images ({', '.join(IMAGE_EXTS)})")
    pairs = []
    for image in images:
        m = None
        if masks is not None:
            m = Path(masks) / f"{image.stem}.png"
            if not m.is_file():
                raise UserError(f"no mask for {image.name}: expected {m} (white = regenerate)")
        pairs.append((image, m))
    return pairs


def inpaint_images(prior: str | Path, inputs: str | Path, out_dir: str | Path, *, mask: str | Path | None = None,
                   masks: str | Path | None = None, boxes: list[str] | None = None, extend: str | None = None,
                   vqgan: str | Path | None = None, n: int = 8, steps: int | None = None, temp: float = 0.9,
                   seed: int = 0, dilate_latents: int = 0, composite_pixels: bool = False, feather_px: int = 0,
                   stride: int = 1, windows: str = "all", batch_windows: int = 256, sampler: str = DEFAULT_SAMPLER,
                   options: dict[str, Any] | None = None, weights: str = "default", device: str = "auto",
                   precision: str = "bf16", max_memory_gb: float = 64.0, overwrite: bool = False, allow_other_vqgan: bool = False,
                   progress: ProgressFn | None = None) -> dict[str, Any]:
    """Inpaint (and outpaint) an image or a folder of images from checkpoints into `out_dir`.

    Per input <stem>: <stem>-000.png ... (n completions; composited with the original pixels
    when `composite_pixels`), <stem>-grid.png (original, mask, completions side by side). Then
    inpaint.json (checkpoint hashes, settings, and per input the fitting, the mask size, t_start).
    Completion j of the i-th input (sorted by name) uses the draws of sample i*n + j. The settings
    are the recipe's `inpaint` section (uvq.config.InpaintConfig); `sampler` runs with `options`.
    """
    from uvq.checkpoint import load_pair, read_prior_meta, resolve_pair, verify_checkpoint
    from uvq.config import VQGANConfig, section_from_dict
    from uvq.runtime import (
        JobProgress,
        batch_share,
        gather_to_main,
        init_distributed,
        on_main,
        reduce_numbers,
        resolve_device,
        share_rounds,
    )
    from uvq.sampling.outputs import claim_shared, provenance_header

    t_begin = time.perf_counter()
    info = init_distributed(resolve_device(device))
    progress = (progress or null_progress) if info.is_main else null_progress
    check_temp(temp)
    if n < 1:
        raise UserError(f"-n must be >= 1 (got {n})")
    _, options = bind_sampler(sampler, options, "inpaint")
    dev = resolve_device(device)
    prior_meta = read_prior_meta(prior)
    refuse_autoregressive("inpaint", meta=prior_meta)  # before anything is written (paper section 4.5)
    window = tuple(int(s) for s in prior_meta["model_config"]["latent_shape"])
    vq_meta, vq_weights = resolve_pair(prior_meta, vqgan, allow_other_vqgan=allow_other_vqgan, progress=progress)
    vq_cfg = section_from_dict(VQGANConfig, vq_meta["model_config"], "model.vqgan")
    f, size = vq_cfg.downsample, vq_cfg.img_size
    box_specs = [parse_box(b) for b in (boxes or [])]
    grow = parse_extend(extend, f)
    frame_latents = ((size + grow["top"] + grow["bottom"]) // f, (size + grow["left"] + grow["right"]) // f)
    # the memory of the mixture, before any frame is allocated (this also checks the stride)
    check_memory(n, frame_latents, window, int(prior_meta["model_config"]["codebook_size"]), stride=stride,
                 wrap=False, batch_windows=batch_windows, max_gb=max_memory_gb, section="inpaint")
    # Validate every input before any work, so that a bad mask fails in a second, not after an hour.
    jobs = [prepare_job(image, size=size, downsample=f, mask_path=m, boxes=box_specs, extend=grow)
            for image, m in list_inputs(inputs, mask=mask, masks=masks)]
    parse_window_choice(windows)
    make_windows(frame_latents, window, stride, False)  # validates the stride
    if steps is not None and not 1 <= steps <= frame_latents[0] * frame_latents[1]:
        raise UserError(f"--steps must be between 1 and the {frame_latents[0] * frame_latents[1]} tokens of the "
                        f"grid (got {steps})")
    if feather_px < 0 or dilate_latents < 0:
        raise UserError("--feather and --dilate must be >= 0")
    names = [f"{job.name}-{j:03d}.png" for job in jobs for j in range(n)] + [f"{job.name}-grid.png" for job in jobs]
    # Damaged weights are refused before the output directory is touched (a refused command changes nothing).
    verify_checkpoint(prior_meta["path"], "prior")
    verify_checkpoint(vq_meta["path"], "vqgan")
    out, claim = claim_shared(out_dir, command="inpaint", overwrite=overwrite,
                              inputs=(prior, prior_meta["path"], vqgan, vq_meta["path"], inputs, mask, masks),
                              entries=[*names, "inpaint.json"])
    net, prior_meta, vq_model, vq_meta, vq_weights = load_pair(prior, vqgan, weights=weights, device=dev, allow_other_vqgan=allow_other_vqgan)

    # This rank's share: a contiguous run of the inputs (uvq.runtime.batch_share with batches of
    # one input); each rank writes its inputs' files, rank 0 the record of all of them.
    for job in jobs:
        progress({"event": "log", "message": f"{job.source}: {job.note}"})
    first, count = batch_share(len(jobs), 1, info)
    tracker = JobProgress(progress, "inpaint", len(jobs), share_rounds(len(jobs), 1, info.world_size))
    stats = CanvasStats()
    records = []
    for i in range(first, first + count):
        job = jobs[i]
        with torch.inference_mode():
            codes = vq_model.encode_codes(job.pixels[None].to(dev))[0]  # [h, w]
        lmask = dilate(latent_mask(job.region, f), dilate_latents)  # [h', w']
        known = torch.full(lmask.shape, int(net.mask_id), dtype=torch.long, device=dev)
        top, left = job.offset[0] // f, job.offset[1] // f
        known[top:top + codes.shape[0], left:left + codes.shape[1]] = codes
        result = inpaint_tokens(net, known, lmask.to(dev), n=n, steps=steps, temp=temp, seed=seed,
                                sample_ids=torch.arange(i * n, (i + 1) * n), window=window, stride=stride,
                                windows=windows, batch_windows=batch_windows, sampler=sampler, options=options,
                                precision=precision, stats=stats)
        images = decode_canvas(vq_model, result.tokens).clamp(0, 1)  # [n, 3, H', W']
        original = frame_pixels(job)  # [3, H', W']
        if composite_pixels:
            images = composite(original, images, feather(job.region, feather_px))
        files = []
        for j in range(n):
            name = f"{job.name}-{j:03d}.png"
            save_png(images[j], out / name)
            files.append(name)
        # the mask panel: what the model regenerates (masked latents) in grey over the original
        patch = F.interpolate(lmask.float()[None, None].cpu(), scale_factor=f, mode="nearest")[0]  # [1, H', W']
        mask_panel = original * (1 - patch) + 0.5 * patch
        grid = save_grid(torch.cat([original[None], mask_panel[None], images]), out / f"{job.name}-grid.png",
                         nrow=n + 2, col_labels=["original", "mask", *(f"#{j}" for j in range(n))])
        records.append({"input": job.source, "name": job.name, "fit": job.note, "frame": list(job.frame),
                        "extend": job.extend, "masked_latents": int(lmask.sum()), "latents": int(lmask.numel()),
                        "t_start": result.t_start, "steps": result.steps, "files": files, "grid": grid.name,
                        "sample_ids": [i * n, (i + 1) * n - 1]})
        tracker.advance(1, {"masked": int(lmask.sum()), "t_start": result.t_start})
    tracker.finish()
    windows_evaluated, = reduce_numbers([stats.windows_evaluated], "sum")
    tokens_s, = reduce_numbers([stats.tokens_s], "max")
    gathered = gather_to_main(records)
    return on_main(lambda: _write_record(out, claim, [r for part in gathered for r in part], {
        **provenance_header("inpaint", out, n, prior_meta, weights, vq_meta, vq_weights),
        "seed": seed,
        "temperature": temp,
        "sampler": sampler,
        "sampler_options": options,
        "start_time": "t_start = max(1, round(steps * masked_latents / latents))",
        "dilate": dilate_latents,
        "composite": composite_pixels,
        "feather": feather_px,
        "stride": stride,
        "windows": windows,
        "device": str(dev),
        "precision": precision if dev.type == "cuda" else "fp32",
        "world_size": info.world_size,
        "network_passes": int(windows_evaluated),
        "timing": {"tokens_s": round(tokens_s, 3), "total_s": round(time.perf_counter() - t_begin, 3)},
    }))


def _write_record(out: Path, claim, records: list[dict[str, Any]], head: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, after every rank's inputs: inpaint.json (the head, then every input's record in order)."""
    from uvq.files import atomic_write_json

    summary = {**head, "inputs": records}
    atomic_write_json(out / "inpaint.json", summary)
    claim.release()
    return summary

