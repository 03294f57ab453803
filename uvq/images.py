"""Images out: tensors in [0,1] to PNG files, grids and plots (the one place that writes pictures).

Every grid uvq writes (samples, inpainting, canvases, reconstructions in training and in `eval
recon`) goes through `save_grid`: cells enlarged by a whole factor so that the shorter side of each
is at least CELL_PX pixels (readable on a screen, and every source pixel stays a square block), tiled
by torchvision's `make_grid`, optionally labelled per row and column. Plots are matplotlib Figures
made by `figure` (no pyplot state) and written by `save_figure`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from uvq.files import atomic_path, atomic_write_bytes

CELL_PX = 64  # the shorter side of every grid cell is enlarged (by a whole factor) to at least this
GRID_PAD = 2  # white pixels between and around grid cells
LABEL_PX = 12  # label font size
LABEL_GAP = 4  # white pixels around a label
FIGURE_DPI = 100


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


def cell_scale(height: int, width: int, min_cell: int = CELL_PX) -> int:
    """The smallest whole factor that makes an image's shorter side at least `min_cell` pixels."""
    return max(1, math.ceil(min_cell / max(1, min(height, width))))


def grid_image(images: torch.Tensor, *, nrow: int | None = None, row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, min_cell: int = CELL_PX, padding: int = GRID_PAD) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> one [3,H',W'] grid image, row-major, `nrow` images per row (default: a square).

    Each image is enlarged by the whole factor `cell_scale(H, W, min_cell)` (nearest neighbour, so
    every pixel stays a k x k block), tiled by torchvision's `make_grid` with `padding` white pixels
    between and around the cells, and, with labels, framed by a white margin holding one label per
    row (left) and per column (top). Without labels the grid is exactly
    [3, rows*(k*H+padding)+padding, nrow*(k*W+padding)+padding].
    """
    from torchvision.utils import make_grid

    x = images.detach().float().cpu().clamp(0, 1)
    b, _, h, w = x.shape
    k = cell_scale(h, w, min_cell)
    if k > 1:
        x = F.interpolate(x, scale_factor=k, mode="nearest")
    nrow = min(b, nrow or max(1, math.ceil(math.sqrt(b))))
    rows = math.ceil(b / nrow)
    for what, labels, count in (("row", row_labels, rows), ("column", col_labels, nrow)):
        if labels is not None and len(labels) != count:
            raise ValueError(f"{len(labels)} {what} labels for a grid of {count} {what}s")
    # make_grid returns a lone image unpadded; pad it by hand so that one image has the same frame as many
    grid = (make_grid(x, nrow=nrow, padding=padding, pad_value=1.0) if b > 1
            else F.pad(x[0], (padding,) * 4, value=1.0))
    if row_labels is None and col_labels is None:
        return grid
    return _label(grid, (k * h, k * w), padding, row_labels or [], col_labels or [])


def _label(grid: torch.Tensor, cell: tuple[int, int], padding: int, row_labels: Sequence[str],
           col_labels: Sequence[str]) -> torch.Tensor:
    """Put `grid` in a white frame: row labels in a left margin, column labels in a top margin."""
    font = ImageFont.load_default(size=LABEL_PX)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = [probe.textlength(s, font=font) for s in row_labels]
    left = math.ceil(max(width)) + 2 * LABEL_GAP if row_labels else 0
    top = LABEL_PX + 2 * LABEL_GAP if col_labels else 0
    im = Image.new("RGB", (grid.shape[2] + left, grid.shape[1] + top), "white")
    im.paste(Image.fromarray(to_uint8(grid)), (left, top))
    draw = ImageDraw.Draw(im)
    ch, cw = cell
    for j, text in enumerate(col_labels):
        text = _fit(draw, text, font, cw)
        x = left + padding + j * (cw + padding) + cw / 2
        draw.text((x, LABEL_GAP), text, fill="black", font=font, anchor="mt")
    for i, text in enumerate(row_labels):
        y = top + padding + i * (ch + padding) + ch / 2
        draw.text((left - LABEL_GAP, y), text, fill="black", font=font, anchor="rm")
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div(255.0)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text` cut (with an ellipsis) to fit in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def save_grid(images: torch.Tensor, path: str | Path, *, nrow: int | None = None,
              row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
              min_cell: int = CELL_PX) -> Path:
    """Write `grid_image(images, ...)` as a PNG atomically (torchvision's `save_image`); every grid uvq writes."""
    from torchvision.utils import save_image

    grid = grid_image(images, nrow=nrow, row_labels=row_labels, col_labels=col_labels, min_cell=min_cell)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="PNG")
    return path


def figure(width_in: float = 6.4, height_in: float = 3.6):
    """A matplotlib Figure that belongs to no pyplot state (thread-safe, no display backend)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=FIGURE_DPI, layout="constrained")


def figure_png(fig) -> bytes:
    """The PNG bytes of a matplotlib Figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    return buf.getvalue()


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib Figure as a PNG atomically."""
    path = Path(path)
    atomic_write_bytes(path, figure_png(fig))
    return path


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
