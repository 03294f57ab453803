"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

docs/method.md section 1: every input of the discriminator, real and fake (the fake image in the
generator's GAN term included), goes through the same kind of random, differentiable
augmentation. Policy "color,translation" (the paper's); ",cutout" is optional. Images are in
[0,1], NCHW; outputs are not clamped (brightness may leave [0,1], as in Zhao et al.).

- color: brightness + U(-0.5, 0.5); saturation x U(0, 2) around the per-pixel channel mean;
  contrast x U(0.5, 1.5) around the image mean (one draw per image for each).
- translation: shift by an integer in [-round(H/8), round(H/8)] (each axis, each image),
  zero padding.
- cutout: one square of half the size per image, centred uniformly, set to zero.

Every operation is made of additions, multiplications and indexing, so gradients reach the
generator's image. Randomness comes from an explicit torch.Generator when one is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uvq.runtime import UserError

POLICY_PARTS = ("color", "translation", "cutout")

# ---------------------------------------------------------------------------------------------
# Random draws: on the generator's device, then moved to the images'
# ---------------------------------------------------------------------------------------------


def _rand(n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    u = torch.rand(n, 1, 1, 1, generator=generator, device=device, dtype=torch.float32)
    return u.to(device=x.device, dtype=x.dtype)  # [B,1,1,1] in [0,1)


def _randint(low: int, high: int, n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Integers in [low, high] (inclusive), shape [B]."""
    device = generator.device if generator is not None else x.device
    return torch.randint(low, high + 1, (n,), generator=generator, device=device).to(x.device)


# ---------------------------------------------------------------------------------------------
# Color
# ---------------------------------------------------------------------------------------------


def rand_brightness(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return x + (_rand(x.shape[0], x, generator) - 0.5)


def rand_saturation(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)  # [B,1,H,W]: per-pixel mean over channels
    return (x - mean) * (_rand(x.shape[0], x, generator) * 2.0) + mean


def rand_contrast(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # [B,1,1,1]: the image mean
    return (x - mean) * (_rand(x.shape[0], x, generator) + 0.5) + mean


def rand_color(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return rand_contrast(rand_saturation(rand_brightness(x, generator), generator), generator)


# ---------------------------------------------------------------------------------------------
# Translation and cutout
# ---------------------------------------------------------------------------------------------


def translate(x: torch.Tensor, shift_h: torch.Tensor, shift_w: torch.Tensor,
              max_shift: tuple[int, int] | None = None) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, i - shift_h[b], j - shift_w[b]], zero outside the image.

    `max_shift` bounds |shift| per axis (it sizes the padding without a device sync).
    """
    b, _, h, w = x.shape
    if max_shift is None:
        max_shift = (int(shift_h.abs().max()), int(shift_w.abs().max())) if b else (0, 0)
    ph, pw = max_shift
    padded = F.pad(x, (pw, pw, ph, ph))  # [B,C,H+2ph,W+2pw]
    rows = (torch.arange(h, device=x.device).view(1, h) - shift_h.view(b, 1) + ph).view(b, h, 1)  # [B,H,1]
    cols = (torch.arange(w, device=x.device).view(1, w) - shift_w.view(b, 1) + pw).view(b, 1, w)  # [B,1,W]
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    # advanced indices on dims 0, 2, 3 around a slice: the result is [B,H,W,C]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # [B,C,H,W]


def rand_translation(x: torch.Tensor, generator: torch.Generator | None = None, ratio: float = 0.125) -> torch.Tensor:
    max_h, max_w = int(x.shape[2] * ratio + 0.5), int(x.shape[3] * ratio + 0.5)
    shift_h = _randint(-max_h, max_h, x.shape[0], x, generator)
    shift_w = _randint(-max_w, max_w, x.shape[0], x, generator)
    return translate(x, shift_h, shift_w, (max_h, max_w))


def cutout_mask(shape: tuple[int, int, int, int], centre_h: torch.Tensor, centre_w: torch.Tensor,
                ratio: float = 0.5, device: torch.device | None = None) -> torch.Tensor:
    """[B,1,H,W] mask, 0 inside a square of size ratio*H x ratio*W centred at (centre_h, centre_w)."""
    b, _, h, w = shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = (centre_h - size_h // 2).view(b, 1, 1)
    left = (centre_w - size_w // 2).view(b, 1, 1)
    i = torch.arange(h, device=device).view(1, h, 1)
    j = torch.arange(w, device=device).view(1, 1, w)
    inside = (i >= top) & (i < top + size_h) & (j >= left) & (j < left + size_w)  # [B,H,W]
    return (~inside).unsqueeze(1)


def rand_cutout(x: torch.Tensor, generator: torch.Generator | None = None, ratio: float = 0.5) -> torch.Tensor:
    b, _, h, w = x.shape
    # the centre may sit anywhere, so the square may be clipped by the border (as Zhao et al.)
    centre_h = _randint(0, h - 1, b, x, generator)
    centre_w = _randint(0, w - 1, b, x, generator)
    return x * cutout_mask(tuple(x.shape), centre_h, centre_w, ratio, x.device).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------------

AUGMENTS = {"color": rand_color, "translation": rand_translation, "cutout": rand_cutout}


def parse_policy(policy: str) -> list[str]:
    """'color,translation[,cutout]' -> its parts in order ('' is no augmentation)."""
    parts = [p.strip() for p in policy.split(",") if p.strip()]
    bad = [p for p in parts if p not in AUGMENTS]
    if bad:
        raise UserError(f"DiffAugment policy {policy!r} has unknown parts {bad}; valid: {', '.join(POLICY_PARTS)}")
    return parts


def diff_augment(x: torch.Tensor, policy: str = "color,translation",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the policy's augmentations in order: [B,C,H,W] -> [B,C,H,W], differentiable."""
    for part in parse_policy(policy):
        x = AUGMENTS[part](x, generator)
    return x
