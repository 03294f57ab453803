"""Inpainting, editing and outpainting (docs/method.md section 5): masks, start time, known tokens, outputs.

The networks are the real `AbsorbingTransformer` and `VQGAN` at tiny sizes with random weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_canvas import K, make_pair, tiny_prior

from uvq.runtime import UserError
from uvq.sampling.canvas import CanvasStats
from uvq.sampling.chain import SampleRNG, run_chain
from uvq.sampling.inpaint import (
    box_mask,
    composite,
    dilate,
    feather,
    fit_to_size,
    inpaint_images,
    inpaint_tokens,
    latent_mask,
    load_mask,
    parse_box,
    parse_extend,
    prepare_job,
    start_time,
)


def save_image(path, w, h, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def save_mask(path, region):
    Image.fromarray((region.numpy() * 255).astype(np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Pixel region -> latent mask
# ---------------------------------------------------------------------------------------------


def brute_latent_mask(region, f):
    h, w = region.shape[0] // f, region.shape[1] // f
    out = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            out[i, j] = bool(region[i * f:(i + 1) * f, j * f:(j + 1) * f].any())
    return out


def test_latent_mask_at_patch_edges():
    f = 4
    # one pixel of a patch masks it
    one_pixel = box_mask([(7, 7, 8, 8)], 16, 16)
    assert brute_latent_mask(one_pixel, f)[1, 1] and latent_mask(one_pixel, f).sum() == 1
    # a box ending exactly at a patch boundary (exclusive x1, y1) does not mask the next patch
    aligned = latent_mask(box_mask([(4, 4, 8, 8)], 16, 16), f)
    assert aligned.nonzero().tolist() == [[1, 1]]
    # one pixel further does
    assert latent_mask(box_mask([(4, 4, 9, 8)], 16, 16), f).nonzero().tolist() == [[1, 1], [1, 2]]
    # a box straddling a corner masks the four patches around it
    assert latent_mask(box_mask([(3, 3, 5, 5)], 16, 16), f).sum() == 4
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        region = torch.rand(16, 24, generator=g) < 0.03
        assert torch.equal(latent_mask(region, f), brute_latent_mask(region, f))


def test_dilate_against_chebyshev_distance():
    mask = torch.zeros(7, 9, dtype=torch.bool)
    mask[1, 2] = mask[5, 7] = True
    for k in (0, 1, 2):
        brute = torch.zeros_like(mask)
        for i in range(7):
            for j in range(9):
                brute[i, j] = any(max(abs(i - a), abs(j - b)) <= k for a, b in mask.nonzero().tolist())
        assert torch.equal(dilate(mask, k), brute)


def test_fitting_maps_the_region_with_the_image():
    # 48x32 -> the short side is already 32: a center crop of 8 columns on each side
    im = Image.new("RGB", (48, 32))
    region = box_mask([(8, 0, 12, 4)], 32, 48)
    pixels, fitted, note = fit_to_size(im, region, 32)
    assert pixels.shape == (3, 32, 32) and "center-cropped to 32x32" in note and "resized" not in note
    assert fitted.nonzero().min(0).values.tolist() == [0, 0] and fitted.nonzero().max(0).values.tolist() == [3, 3]
    # 64x64 -> halved: a fitted pixel is set when its 2x2 footprint touches the region
    g = torch.Generator().manual_seed(0)
    region = torch.rand(64, 64, generator=g) < 0.02
    _, fitted, note = fit_to_size(Image.new("RGB", (64, 64)), region, 32)
    assert "resized to 32x32" in note
    assert torch.equal(fitted, F.max_pool2d(region.float()[None, None], 2)[0, 0] > 0)
    # the VQGAN's size: used as is
    _, fitted, note = fit_to_size(Image.new("RGB", (32, 32)), region[:32, :32], 32)
    assert torch.equal(fitted, region[:32, :32]) and "used as is" in note


# ---------------------------------------------------------------------------------------------
# The chain from t_start: known tokens never change, and it is uvq sample's chain
# ---------------------------------------------------------------------------------------------


def test_start_time_follows_the_formula():
    for n_masked, n, steps in [(64, 256, 256), (1, 256, 256), (3, 16, 16), (5, 16, 8), (1, 64, 10), (16, 16, 7)]:
        assert start_time(n_masked, n, steps) == max(1, round(steps * n_masked / n))
    net = tiny_prior()
    known = torch.randint(0, K, (4, 4))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1:3, 1:4] = True  # 6 of 16
    stats = CanvasStats()
    result = inpaint_tokens(net, known, mask, n=2, steps=16, temp=1.0, seed=0, stats=stats)
    assert result.t_start == 6 and stats.steps == 6  # the chain runs t = 6 .. 1


def test_inpainting_never_changes_known_tokens_and_fills_the_region():
    net = tiny_prior(n_tokens=16)
    g = torch.Generator().manual_seed(0)
    for shape, trial in [((4, 4), 0), ((4, 4), 1), ((6, 9), 2)]:  # (6, 9): larger than the window
        known = torch.randint(0, K, shape, generator=g)
        mask = torch.rand(shape, generator=g) < 0.4
        mask[0, 0] = True
        result = inpaint_tokens(net, known, mask, n=3, steps=None, temp=1.0, seed=trial, window=(4, 4), stride=2)
        assert torch.equal(result.tokens[:, ~mask], known[~mask].expand(3, -1))
        assert bool((result.tokens < K).all())
        assert not torch.equal(result.tokens[0], result.tokens[1]) or int(mask.sum()) < 3


def test_inpainting_is_the_sampling_chain_from_t_start():
    net = tiny_prior()
    known = torch.randint(0, K, (4, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2] = True
    result = inpaint_tokens(net, known, mask, n=3, steps=12, temp=0.9, seed=5)
    x = torch.where(mask, torch.full_like(known, K), known).flatten()[None].expand(3, -1).contiguous()
    with torch.no_grad():
        direct, _ = run_chain(x, net, mask_id=K, steps=12, temp=0.9, rng=SampleRNG(5, [0, 1, 2]), t_start=6)
    assert result.t_start == 6 and torch.equal(result.tokens.flatten(1), direct)
    # the chosen sampler and its options are the ones that run
    result = inpaint_tokens(net, known, mask, n=3, steps=12, temp=0.9, seed=5, sampler="maskgit_cosine.v1",
                            options={"choice_temp": 2.0, "top_k": 4})
    with torch.no_grad():
        direct, _ = run_chain(x, net, sampler="maskgit_cosine.v1", mask_id=K, steps=12, temp=0.9,
                              rng=SampleRNG(5, [0, 1, 2]), t_start=6, choice_temp=2.0, top_k=4)
    assert torch.equal(result.tokens.flatten(1), direct)


# ---------------------------------------------------------------------------------------------
# Compositing
# ---------------------------------------------------------------------------------------------


def test_composite_keeps_the_original_outside_and_feathers_linearly():
    region = torch.zeros(12, 12, dtype=torch.bool)
    region[4:8, 4:8] = True
    alpha = feather(region, 3)
    for i in range(12):
        for j in range(12):
            d = max(max(4 - i, i - 7, 0), max(4 - j, j - 7, 0))  # Chebyshev distance to the region
            assert alpha[i, j].item() == pytest.approx(max(0.0, (3 - d) / 3))
    orig, gen = torch.zeros(3, 12, 12), torch.ones(3, 12, 12)
    out = composite(orig, gen, alpha)
    assert bool((out[:, region] == 1).all()) and bool((out[:, alpha == 0] == 0).all())
    assert torch.equal(feather(region, 0), region.float())


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line
# ---------------------------------------------------------------------------------------------


def test_bad_regions_are_user_errors(tmp_path):
    image = save_image(tmp_path / "photo.png", 20, 16)
    with pytest.raises(UserError, match="is 20x15 pixels but image photo.png is 20x16"):
        prepare_job(image, size=16, downsample=2, mask_path=save_mask(tmp_path / "m.png", torch.ones(15, 20, dtype=torch.bool)))
    with pytest.raises(UserError, match="no white pixels"):
        prepare_job(image, size=16, downsample=2, mask_path=save_mask(tmp_path / "e.png", torch.zeros(16, 20, dtype=torch.bool)))
    with pytest.raises(UserError, match="lies outside image photo.png"):
        prepare_job(image, size=16, downsample=2, boxes=[parse_box("10,10,21,12")])
    with pytest.raises(UserError, match="is empty or lies outside"):
        prepare_job(image, size=16, downsample=2, boxes=[parse_box("5,5,5,9")])
    with pytest.raises(UserError, match="outside the central 16x16 crop"):
        prepare_job(image, size=16, downsample=2, boxes=[parse_box("0,0,2,2")])
    with pytest.raises(UserError, match="nothing to regenerate"):
        prepare_job(image, size=16, downsample=2)
    with pytest.raises(UserError, match="is not x0,y0,x1,y1"):
        parse_box("1,2,3")
    with pytest.raises(UserError, match="multiple of the VQGAN's downsampling factor 4"):
        parse_extend("left=6", 4)
    assert parse_extend("left=8, bottom=4", 4) == {"left": 8, "right": 0, "top": 0, "bottom": 4}
    with pytest.raises(UserError, match="does not exist"):
        load_mask(tmp_path / "none.png", 16, 20)


# ---------------------------------------------------------------------------------------------
# `uvq inpaint`: outputs, batch mode, outpainting, the CLI
# ---------------------------------------------------------------------------------------------


def test_inpaint_images_writes_completions_grid_and_provenance(tmp_path):
    from uvq.images import load_rgb

    _, prior_ckpt = make_pair(tmp_path / "run")
    image = save_image(tmp_path / "photo.png", 24, 16)
    out = tmp_path / "edits"
    summary = inpaint_images(prior_ckpt, image, out, boxes=["8,4,12,8"], n=3, steps=64, temp=0.9, seed=1,
                             composite_pixels=True, feather_px=2, device="cpu")
    rec = summary["inputs"][0]
    assert rec["files"] == ["photo-000.png", "photo-001.png", "photo-002.png"] and (out / "photo-grid.png").is_file()
    assert "center-cropped to 16x16" in rec["fit"] and rec["masked_latents"] == 4 and rec["latents"] == 64
    assert rec["t_start"] == round(64 * 4 / 64)
    saved = json.loads((out / "inpaint.json").read_text())
    assert saved["composite"] is True and len(saved["prior"]["sha256"]) == 64
    # composited: far from the region the pixels are the (fitted) original's, to PNG rounding
    done = load_rgb(out / "photo-000.png")
    original = torch.from_numpy(np.array(Image.open(image))).permute(2, 0, 1).float()[:, :, 4:20] / 255
    assert done.shape == (3, 16, 16)
    assert torch.allclose(done[:, 10:, :], original[:, 10:, :], atol=1 / 255 + 1e-6)
    grid = load_rgb(out / "photo-grid.png")
    assert grid.shape[-1] > grid.shape[-2] * 3  # original, mask and 3 completions side by side


def test_batch_mode_and_outpainting(tmp_path):
    from uvq.images import load_rgb

    _, prior_ckpt = make_pair(tmp_path / "run")
    (tmp_path / "in").mkdir()
    (tmp_path / "masks").mkdir()
    for i, stem in enumerate(["a", "b"]):
        save_image(tmp_path / "in" / f"{stem}.png", 16, 16, seed=i)
        region = torch.zeros(16, 16, dtype=torch.bool)
        region[i * 4:i * 4 + 3, 2:5] = True
        save_mask(tmp_path / "masks" / f"{stem}.png", region)
    summary = inpaint_images(prior_ckpt, tmp_path / "in", tmp_path / "o1", masks=tmp_path / "masks", n=2, steps=16,
                             device="cpu")
    assert [r["name"] for r in summary["inputs"]] == ["a", "b"]
    assert [r["sample_ids"] for r in summary["inputs"]] == [[0, 1], [2, 3]]
    # outpainting: 16x16 grown to 16x24 pixels = 8x12 latents, larger than the 8x8 window
    summary = inpaint_images(prior_ckpt, tmp_path / "in" / "a.png", tmp_path / "o2", extend="left=4,right=4", n=1,
                             steps=24, stride=2, device="cpu")
    rec = summary["inputs"][0]
    assert rec["frame"] == [16, 24] and rec["masked_latents"] == 32 and rec["t_start"] == round(24 * 32 / 96)
    assert load_rgb(tmp_path / "o2" / "a-000.png").shape == (3, 16, 24)
    with pytest.raises(UserError, match="no mask for b.png"):
        (tmp_path / "masks" / "b.png").unlink()
        inpaint_images(prior_ckpt, tmp_path / "in", tmp_path / "o3", masks=tmp_path / "masks", n=1, device="cpu")


def test_inpaint_cli_and_one_line_errors(tmp_path, capsys):
    from uvq.cli.app import main

    _, prior_ckpt = make_pair(tmp_path / "run")
    image = save_image(tmp_path / "photo.png", 16, 16)

    def uvq(*args):
        with pytest.raises(SystemExit) as info:
            main(list(args))
        cap = capsys.readouterr()
        return info.value.code, cap.out, cap.err

    code, out, err = uvq("inpaint", str(image), "--box", "2,2,6,6", "--box", "10,10,12,12", "--prior", str(prior_ckpt),
                         "-n", "2", "--steps", "16", "--out", str(tmp_path / "e"), "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["inputs"][0]["masked_latents"] == 4 + 1
    mask = save_mask(tmp_path / "wrong.png", torch.ones(8, 16, dtype=torch.bool))
    bad = [
        (["--mask", str(mask)], "is 16x8 pixels but image photo.png is 16x16"),
        (["--box", "0,0,17,4"], "lies outside image photo.png"),
        (["--box", "0,0,4,4", "--dilate", "-1"], "inpaint.dilate must be >= 0"),
        (["--box", "0,0,4,4", "--feather", "2"], "needs inpaint.composite (--composite)"),
        (["--box", "0,0,4,4", "--temp", "1e-45"], "inpaint.temp must be between 0.001 and 1000"),
        (["--box", "0,0,4,4", "inpaint.options.top_k=0"], "inpaint.options.top_k must be an integer >= 1"),
        (["--box", "0,0,4,4", "inpaint.options.top_p=0"], "inpaint.options.top_p must be a number in (0, 1]"),
        (["--box", "0,0,4,4", "inpaint.sampler=nope.v1"], "inpaint.sampler: unknown samplers name 'nope.v1'"),
        (["--extend", "left=100000", "inpaint.max_memory_gb=0.5"], "needs about 0.8"),
        (["--extend", "left=100000,top=100000"], "over inpaint.max_memory_gb=64"),
        (["--extend", "left=3"], "multiple of the VQGAN's downsampling factor 2"),
        ([], "nothing to regenerate"),
    ]
    for extra, message in bad:
        code, _, err = uvq("inpaint", str(image), "--prior", str(prior_ckpt), "--out", str(tmp_path / "bad"),
                           "--device", "cpu", *extra)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (extra, err)
