"""The embedded demo dataset: procedurally drawn landscapes, deterministic by index.

uvq needs data that installs with the package, needs no network, and that a tiny VQGAN (8x8 codes
from 64 entries at 32x32) learns within a minute or two on 2 CPU cores. Photographs are too rich
for that budget, so the demo set is drawn: a sky gradient with a sun or a moon, one or two layers
of mountain silhouettes, and a foreground of grass, sand, snow or water. A handful of discrete
choices (time of day, ground, number of ranges, snow caps) and continuous variations (horizon
height, sun position and size, peak positions and heights, colour jitter) give 2048 distinct but
strongly structured images with bold colours and almost no fine texture.

It is a smoke-test and teaching set, NOT a benchmark: numbers measured on it say nothing about
the paper's datasets.

Every image is drawn in continuous coordinates, so any size can be rendered; small sizes are
supersampled (then box-filtered) so that edges are anti-aliased rather than jagged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DEMO_SEED = 0x5EED  # part of every image's identity: changing it changes the dataset

# ---------------------------------------------------------------------------------------------
# Palettes (RGB in [0,1]); one per time of day
# ---------------------------------------------------------------------------------------------

_TIMES = ("day", "sunset", "night")
_TIME_P = (0.5, 0.3, 0.2)

_SKY = {  # (zenith, horizon)
    "day": ((0.16, 0.42, 0.86), (0.62, 0.82, 1.00)),
    "sunset": ((0.28, 0.16, 0.48), (1.00, 0.55, 0.22)),
    "night": ((0.02, 0.04, 0.16), (0.14, 0.18, 0.40)),
}
_ORB = {  # colour of the sun or moon
    "day": (1.00, 0.96, 0.55),
    "sunset": (1.00, 0.80, 0.30),
    "night": (0.93, 0.93, 0.84),
}
_LIGHT = {  # how the scene below the sky is lit: a multiplicative tint
    "day": (1.00, 1.00, 1.00),
    "sunset": (0.85, 0.62, 0.55),
    "night": (0.30, 0.34, 0.52),
}
_GROUNDS = ("grass", "sand", "snow", "water")
_GROUND = {
    "grass": (0.22, 0.62, 0.20),
    "sand": (0.90, 0.76, 0.42),
    "snow": (0.94, 0.96, 1.00),
    "water": (0.10, 0.32, 0.62),
}
_ROCK = ((0.36, 0.33, 0.42), (0.46, 0.36, 0.30), (0.30, 0.40, 0.36))  # near-range colours


# ---------------------------------------------------------------------------------------------
# One scene: the drawing order is sky, orb, far range, near range, ground (and reflection)
# ---------------------------------------------------------------------------------------------


def _scene_params(index: int) -> dict:
    """All random choices of image `index`, drawn from a generator seeded by (DEMO_SEED, index)."""
    rng = np.random.default_rng([DEMO_SEED, int(index)])
    time = _TIMES[rng.choice(3, p=_TIME_P)]
    ground = _GROUNDS[rng.integers(len(_GROUNDS))]
    horizon = rng.uniform(0.58, 0.76)
    orb_y = rng.uniform(0.12, 0.30) if time != "sunset" else rng.uniform(0.30, horizon - 0.12)
    ranges = []
    for layer in range(int(rng.integers(1, 3))):  # 1 or 2 mountain ranges
        n_peaks = int(rng.integers(1, 4))
        ranges.append({
            "peaks_x": rng.uniform(-0.1, 1.1, n_peaks),
            "peaks_h": rng.uniform(0.18, 0.40, n_peaks) * (1.0 if layer == 0 else 0.7),
            "slope": rng.uniform(0.7, 1.6),
            "colour": _ROCK[rng.integers(len(_ROCK))],
            "snow": bool(rng.random() < 0.4),
        })
    return {
        "time": time,
        "ground": ground,
        "horizon": horizon,
        "orb_x": rng.uniform(0.15, 0.85),
        "orb_y": orb_y,
        "orb_r": rng.uniform(0.07, 0.12) * (1.4 if time == "sunset" else 1.0),
        "ranges": ranges,
        "jitter": rng.uniform(-0.06, 0.06, 3),
    }


def _mix(a, b, t):
    """Linear blend of colours a and b by t ([...,1] weights)."""
    return np.asarray(a) * (1.0 - t) + np.asarray(b) * t


def _render(params: dict, res: int) -> np.ndarray:
    """Draw one scene as float [res,res,3] in [0,1]."""
    c = (np.arange(res) + 0.5) / res
    yy, xx = np.meshgrid(c, c, indexing="ij")  # [res,res] each, y grows downwards
    time, horizon = params["time"], params["horizon"]
    light = np.asarray(_LIGHT[time])

    # Sky: a vertical gradient from zenith to horizon colour.
    zenith, low = _SKY[time]
    t = np.clip(yy / horizon, 0, 1)[..., None] ** 1.5
    img = _mix(zenith, low, t)  # [res,res,3]

    # Sun or moon: a disc with a soft halo.
    d = np.hypot(xx - params["orb_x"], yy - params["orb_y"])[..., None]
    halo = np.clip(1.0 - (d - params["orb_r"]) / (2.5 * params["orb_r"]), 0, 1) ** 2 * 0.35
    img = _mix(img, _ORB[time], np.maximum(halo, (d <= params["orb_r"]).astype(float)))

    # Mountain ranges, far to near: each ridge is the upper envelope of triangular peaks; the far
    # range is washed towards the horizon colour (aerial perspective).
    n = len(params["ranges"])
    for i, rng_ in enumerate(params["ranges"]):
        far = i < n - 1
        ridge = np.full(res, horizon)
        for px, ph in zip(rng_["peaks_x"], rng_["peaks_h"], strict=True):
            ridge = np.minimum(ridge, horizon - ph + rng_["slope"] * np.abs(c - px))
        mountain = yy >= ridge[None, :]  # [res,res]
        colour = np.asarray(rng_["colour"]) * light
        if far:
            colour = _mix(colour, low, 0.45)
        img = np.where(mountain[..., None], colour, img)
        if rng_["snow"]:  # caps above a snowline at 70% of the range's highest peak
            snowline = horizon - 0.7 * rng_["peaks_h"].max()
            snow_colour = np.asarray((0.95, 0.95, 0.98)) * light
            img = np.where((mountain & (yy < snowline))[..., None], snow_colour, img)

    # Ground: a flat colour darkening towards the viewer; water also mirrors the sky and the orb.
    below = (yy >= horizon)[..., None]
    depth = np.clip((yy - horizon) / (1.0 - horizon), 0, 1)[..., None]
    ground = np.asarray(_GROUND[params["ground"]]) * light * (1.0 - 0.35 * depth)
    if params["ground"] == "water":
        mirror = _mix(low, zenith, depth)
        ground = _mix(ground, mirror, 0.35)
        glint = (np.abs(xx - params["orb_x"]) < params["orb_r"] * (1.0 - 0.5 * depth[..., 0]))[..., None]
        ground = np.where(glint, _mix(ground, _ORB[time], 0.6), ground)
    img = np.where(below, ground, img)

    img = img + params["jitter"]  # a small global colour shift per image
    return np.clip(img, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def demo_array(index: int, size: int) -> np.ndarray:
    """Image `index` of the demo set as uint8 [size,size,3] (the exact pixels every loader sees)."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    ss = max(1, -(-64 // size))  # supersample small images to at least 64 px, then box-filter
    img = _render(_scene_params(index), size * ss)  # [size*ss, size*ss, 3]
    img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))  # [size,size,3]
    return np.round(img * 255.0).astype(np.uint8)


def demo_image(index: int, size: int) -> torch.Tensor:
    """Image `index` of the demo set as FloatTensor [3,size,size] in [0,1]."""
    return torch.from_numpy(demo_array(index, size)).permute(2, 0, 1).float().div(255.0)


def demo_key(index: int) -> str:
    """The key of demo image `index` (used by the validation split): 'demo-%06d'."""
    return f"demo-{index:06d}"


def write_demo_folder(path: str | Path, n: int, size: int) -> list[Path]:
    """Write demo images 0..n-1 as PNG files `demo-%06d.png` under `path` (atomically, one by one)."""
    from uvq.images import save_png

    path = Path(path)
    return [save_png(demo_image(i, size), path / f"{demo_key(i)}.png") for i in range(n)]
