"""uvq.vqgan.augment: DiffAugment's policies, their bounds, exact translation/cutout, and gradients."""

from __future__ import annotations

import pytest
import torch

from uvq.runtime import UserError
from uvq.vqgan.augment import (
    cutout_mask,
    diff_augment,
    parse_policy,
    rand_brightness,
    rand_contrast,
    rand_cutout,
    rand_saturation,
    rand_translation,
    translate,
)


def images(b: int = 8, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("policy", ["", "color", "translation", "cutout", "color,translation", "color,translation,cutout"])
def test_every_policy_keeps_shape_dtype_and_is_reproducible(policy):
    x = images()
    y = diff_augment(x, policy, gen(3))
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, diff_augment(x, policy, gen(3)))
    if policy:
        assert not torch.equal(y, diff_augment(x, policy, gen(4)))
    else:
        assert torch.equal(y, x)


def test_brightness_adds_one_offset_per_image_within_half():
    x = images(64)
    shift = rand_brightness(x, gen()) - x
    per_image = shift.flatten(1)
    torch.testing.assert_close(per_image, per_image[:, :1].expand_as(per_image))
    assert per_image.abs().max() <= 0.5 and per_image[:, 0].std() > 0.1  # spread over U(-0.5,0.5)
    assert per_image.min() < 0 < per_image.max()


def test_saturation_scales_around_the_per_pixel_channel_mean():
    x = images(64)
    y = rand_saturation(x, gen())
    torch.testing.assert_close(y.mean(1), x.mean(1))  # the grey level is kept
    dev_x, dev_y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    factor = (dev_y.flatten(1) * dev_x.flatten(1)).sum(1) / dev_x.flatten(1).pow(2).sum(1)
    torch.testing.assert_close(dev_y, factor.view(-1, 1, 1, 1) * dev_x)
    assert factor.min() >= 0 and factor.max() <= 2 and factor.max() > 1.5 and factor.min() < 0.5


def test_contrast_scales_around_the_image_mean():
    x = images(64)
    y = rand_contrast(x, gen())
    torch.testing.assert_close(y.mean((1, 2, 3)), x.mean((1, 2, 3)))
    dev_x, dev_y = x - x.mean((1, 2, 3), keepdim=True), y - y.mean((1, 2, 3), keepdim=True)
    factor = (dev_y.flatten(1) * dev_x.flatten(1)).sum(1) / dev_x.flatten(1).pow(2).sum(1)
    torch.testing.assert_close(dev_y, factor.view(-1, 1, 1, 1) * dev_x)
    assert factor.min() >= 0.5 and factor.max() <= 1.5


def test_color_order_is_brightness_saturation_contrast():
    x = images()
    g1, g2 = gen(7), gen(7)
    expected = rand_contrast(rand_saturation(rand_brightness(x, g2), g2), g2)
    torch.testing.assert_close(diff_augment(x, "color", g1), expected)


def test_translate_matches_a_brute_force_shift_with_zeros():
    x = images(3, 8, 10)
    sh, sw = torch.tensor([2, -1, 0]), torch.tensor([-3, 0, 1])
    y = translate(x, sh, sw)
    ref = torch.zeros_like(x)
    for b in range(3):
        for i in range(8):
            for j in range(10):
                si, sj = i - int(sh[b]), j - int(sw[b])
                if 0 <= si < 8 and 0 <= sj < 10:
                    ref[b, :, i, j] = x[b, :, si, sj]
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(translate(x, sh, sw, (3, 3)), ref)  # a larger pad changes nothing


def test_random_translation_stays_within_an_eighth():
    x = images(32, 16, 16) + 1.0  # strictly positive, so padding is visible as zeros
    y = rand_translation(x, gen())
    found = []
    for b in range(32):
        matches = [(dh, dw) for dh in range(-4, 5) for dw in range(-4, 5)
                   if torch.equal(y[b:b + 1], translate(x[b:b + 1], torch.tensor([dh]), torch.tensor([dw])))]
        assert len(matches) == 1
        found.append(matches[0])
    assert max(max(abs(dh), abs(dw)) for dh, dw in found) <= 2  # 16/8
    assert len(set(found)) > 5


def test_cutout_zeroes_one_half_size_square():
    x = images(16, 16, 16) + 1.0
    y = rand_cutout(x, gen())
    zero = y[:, 0] == 0
    torch.testing.assert_close(y[~zero.unsqueeze(1).expand_as(y)], x[~zero.unsqueeze(1).expand_as(x)])
    for b in range(16):
        rows, cols = zero[b].any(1).nonzero().flatten(), zero[b].any(0).nonzero().flatten()
        assert 1 <= len(rows) <= 8 and 1 <= len(cols) <= 8
        assert zero[b].sum() == len(rows) * len(cols)  # a rectangle (a square clipped by the border)
    mask = cutout_mask((1, 3, 16, 16), torch.tensor([8]), torch.tensor([8]))
    assert (~mask).sum() == 64 and not mask[0, 0, 4:12, 4:12].any()


def test_gradients_reach_the_fake_images():
    x = images().requires_grad_(True)
    diff_augment(x, "color,translation,cutout", gen()).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # translation alone: the gradient is 1 on pixels that stay in the picture, 0 on those pushed out
    x2 = images(1).requires_grad_(True)
    translate(x2, torch.tensor([2]), torch.tensor([0])).sum().backward()
    assert torch.equal(x2.grad[0, :, :-2], torch.ones(3, 14, 16)) and x2.grad[0, :, -2:].abs().sum() == 0


def test_without_generator_uses_the_global_rng():
    x = images()
    torch.manual_seed(5)
    a = diff_augment(x)
    torch.manual_seed(5)
    torch.testing.assert_close(a, diff_augment(x))


def test_policy_parsing():
    assert parse_policy("color, translation,cutout") == ["color", "translation", "cutout"]
    assert parse_policy("") == []
    with pytest.raises(UserError, match="flip"):
        diff_augment(images(), "color,flip")
