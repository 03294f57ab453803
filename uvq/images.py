"""Images out: tensors in [0,1] to PNG files and grids (the one place that writes pictures)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from uvq.files import atomic_path


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[3,H,W] or [B,3,H,W] float in [0,1] -> HWC / BHWC uint8 (rounded, clamped)."""
    x = x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return (x.permute(1, 2, 0) if x.ndim == 3 else x.permute(0, 2, 3, 1)).numpy()


def save_png(x: torch.Tensor, path: str | Path) -> Path:
    """Write one [3,H,W] image in [0,1] atomically."""
    path = Path(path)
    arr = to_uint8(x)
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """[B,C,H,W] -> [C, rows*(H+pad)+pad, nrow*(W+pad)+pad], row-major."""
    b, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=images.dtype)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y:y + h, x:x + w] = images[i].detach().cpu()
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    """Save a grid PNG of [B,3,H,W] images in [0,1]; `upscale` enlarges tiny images (nearest)."""
    if upscale > 1:
        images = torch.nn.functional.interpolate(images.detach().float().cpu(), scale_factor=upscale, mode="nearest")
    return save_png(make_grid(images.detach().float().cpu(), nrow=nrow), path)


def load_rgb(path: str | Path) -> torch.Tensor:
    """Read any Pillow-readable image as [3,H,W] float in [0,1] (grayscale, RGBA, 16-bit -> RGB)."""
    with Image.open(path) as im:
        im = to_rgb(im)
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; 16-bit and float images are rescaled, alpha is composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")
