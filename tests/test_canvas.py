"""The big canvas (docs/method.md section 4, Eq. 8): windows, the mixture, wrap, and `uvq upscale-canvas`.

The networks are the real `AbsorbingTransformer` and `VQGAN` at tiny sizes with random weights.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from uvq.prior.model import AbsorbingTransformer
from uvq.runtime import UserError
from uvq.sampling.canvas import (
    WindowMixture,
    canvas_latents,
    decode_canvas,
    make_windows,
    parse_hw,
    parse_window_choice,
    sample_canvases,
)
from uvq.sampling.chain import sample_tokens

K = 16


def tiny_prior(n_tokens: int = 16, seed: int = 0) -> AbsorbingTransformer:
    torch.manual_seed(seed)
    net = AbsorbingTransformer(codebook_size=K, n_tokens=n_tokens, n_embd=32, n_head=2, n_layer=1).eval()
    with torch.no_grad():  # random but not tiny outputs, so that windows disagree visibly
        net.head.weight.normal_(0, 1.0)
        net.pos_emb.normal_(0, 0.5)
    return net


def network(net):
    def predict(x):
        with torch.no_grad():
            return net(x)
    return predict


def make_pair(root, *, codebook_size=K, img_size=16, seed=0):
    """A tiny VQGAN (16x16 pixels, downsampling 2, 8x8 latents) and a prior whose provenance names it."""
    from uvq.checkpoint import read_meta, save_checkpoint
    from uvq.config import PriorConfig, VQGANConfig
    from uvq.prior.latents import tokenizer_record
    from uvq.vqgan.model import build_vqgan

    torch.manual_seed(seed)
    vc = VQGANConfig(img_size=img_size, nf=32, ch_mult=[1, 2], res_blocks=1, attn_resolutions=[], emb_dim=8,
                     codebook_size=codebook_size)
    vq_ckpt = save_checkpoint(root / "vqgan", 10, kind="vqgan", model_config=dataclasses.asdict(vc),
                              weights={"model": build_vqgan(vc)})
    pc = PriorConfig(n_embd=32, n_head=2, n_layer=1, codebook_size=codebook_size, latent_shape=list(vc.latent_shape))
    net = AbsorbingTransformer(codebook_size=codebook_size, n_tokens=pc.n_tokens, n_embd=32, n_head=2, n_layer=1)
    tok = tokenizer_record(read_meta(vq_ckpt) | {"weights_sha256": read_meta(vq_ckpt)["weights_sha256"]["model"]},
                           "model")
    prior_ckpt = save_checkpoint(root / "prior", 20, kind="prior", model_config=dataclasses.asdict(pc),
                                 weights={"model": net}, provenance={"tokenizer": tok})
    return vq_ckpt, prior_ckpt


# ---------------------------------------------------------------------------------------------
# Geometry: every position covered, edges included, wrap, bad sizes
# ---------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), extra_h=st.integers(0, 14), extra_w=st.integers(0, 14),
       stride=st.integers(1, 6), wrap=st.booleans())
def test_every_position_is_covered_and_windows_are_training_sized(h, w, extra_h, extra_w, stride, wrap):
    canvas = (h + extra_h, w + extra_w)
    if stride > min(h, w):
        with pytest.raises(UserError, match="larger than the window"):
            make_windows(canvas, (h, w), stride, wrap)
        return
    win = make_windows(canvas, (h, w), stride, wrap)
    assert win.index.shape == (len(win), h * w)
    assert bool((win.coverage() >= 1).all())
    # each window is a contiguous h x w block (modulo the canvas when wrapped), in raster order
    for (top, left), idx in zip(win.offsets.tolist(), win.index.tolist(), strict=True):
        brute = [((top + i) % canvas[0]) * canvas[1] + (left + j) % canvas[1] for i in range(h) for j in range(w)]
        assert idx == brute
        if not wrap:
            assert top + h <= canvas[0] and left + w <= canvas[1]
    tops = sorted({t for t, _ in win.offsets.tolist()})
    if not wrap:
        assert tops[0] == 0 and tops[-1] == canvas[0] - h  # the bottom edge window is always there
        assert all(b - a <= stride for a, b in zip(tops, tops[1:], strict=False))
    else:
        assert tops == list(range(0, canvas[0], stride))


@settings(max_examples=40, deadline=None)
@given(extra=st.tuples(st.integers(0, 9), st.integers(0, 9)), m=st.integers(1, 6), stride=st.integers(1, 3),
       wrap=st.booleans(), seed=st.integers(0, 2**31), p_masked=st.floats(0.02, 1.0))
def test_random_windows_cover_every_masked_position(extra, m, stride, wrap, seed, p_masked):
    window = (3, 3)
    canvas = (3 + extra[0], 3 + extra[1])
    mix = WindowMixture(lambda x: x, make_windows(canvas, window, stride, wrap), codebook_size=K, mask_id=K,
                        random_windows=m, seed=seed)
    g = torch.Generator().manual_seed(seed)
    n = canvas[0] * canvas[1]
    x = torch.randint(0, K, (3, n), generator=g)
    x[torch.rand(3, n, generator=g) < p_masked] = K
    rows, wins = mix._pairs(x)
    covered = torch.zeros(3, n, dtype=torch.bool)
    for r, w in zip(rows.tolist(), wins.tolist(), strict=True):
        covered[r, mix.index[w]] = True
    assert bool(covered[x == K].all())
    # M drawn windows per canvas (fewer when fewer hold a mask), plus covering ones from the tiling
    drawn = [(wins[rows == r] < len(mix.windows)).sum().item() for r in range(3)]
    with_mask = mix.index[: len(mix.windows)]
    for r in range(3):
        holding = int((x[r][with_mask] == K).any(-1).sum())
        assert drawn[r] == min(m, holding)
    # the draw depends on the canvas's tokens, not on the batch it is in
    rows1, wins1 = mix._pairs(x[1:2])
    assert sorted(wins1.tolist()) == sorted(wins[rows == 1].tolist())


def test_canvas_sizes_and_bad_geometry_are_user_errors():
    assert parse_hw("512x1024", "--size") == (512, 1024) and parse_hw("64", "--size") == (64, 64)
    assert canvas_latents(size=(32, 64), latent_size=None, downsample=4, window=(8, 8)) == (8, 16)
    assert canvas_latents(size=None, latent_size=(9, 8), downsample=4, window=(8, 8)) == (9, 8)
    with pytest.raises(UserError, match="smaller than the prior's 8x8 training window"):
        canvas_latents(size=None, latent_size=(7, 16), downsample=4, window=(8, 8))
    with pytest.raises(UserError, match="not a multiple of the VQGAN's downsampling factor 4"):
        canvas_latents(size=(34, 64), latent_size=None, downsample=4, window=(8, 8))
    with pytest.raises(UserError, match="exactly one of --size"):
        canvas_latents(size=(32, 32), latent_size=(8, 8), downsample=4, window=(8, 8))
    with pytest.raises(UserError, match="--stride 9 is larger than the window"):
        make_windows((16, 16), (8, 8), 9)
    with pytest.raises(UserError, match="is not HxW"):
        parse_hw("big", "--size")
    assert parse_window_choice("all") is None and parse_window_choice("random:12") == 12
    for bad in ("random", "random:0", "some"):
        with pytest.raises(UserError, match="random:M"):
            parse_window_choice(bad)
    net = tiny_prior()
    with pytest.raises(UserError, match="smaller than the prior's 4x4"):
        sample_canvases(net, 1, (3, 8), steps=4, temp=1.0)
    with pytest.raises(UserError, match="--steps must be between 1 and the canvas's 32 tokens"):
        sample_canvases(net, 1, (4, 8), steps=33, temp=1.0)


# ---------------------------------------------------------------------------------------------
# Eq. 8: the mixture against a brute-force average over windows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride,wrap,max_batch", [(1, False, 1000), (2, False, 3), (1, True, 5), (3, True, 1000)])
def test_mixture_equals_brute_force_average(stride, wrap, max_batch):
    net = tiny_prior()
    canvas, window = (6, 7), (4, 4)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, K, (2, 42), generator=g)
    x[torch.rand(2, 42, generator=g) < 0.5] = K
    x[1, :] = torch.randint(0, K, (42,), generator=g)  # canvas 1: known except a corner,
    x[1, 0] = K  # so that most of its windows hold no mask and are skipped
    mix = WindowMixture(network(net), make_windows(canvas, window, stride, wrap), codebook_size=K, mask_id=K,
                        max_batch=max_batch)
    with torch.no_grad():
        got = mix(x)  # [2, 42, K]
    win = make_windows(canvas, window, stride, wrap)
    for b in range(2):
        total = torch.zeros(42, K, dtype=torch.float64)
        count = torch.zeros(42)
        for top, left in win.offsets.tolist():  # a literal loop over windows, one pass each
            pos = [((top + i) % 6) * 7 + (left + j) % 7 for i in range(4) for j in range(4)]
            with torch.no_grad():
                p = net(x[b, pos][None])[0].double().softmax(-1)  # [16, K]
            for k, q in enumerate(pos):
                total[q] += p[k]
                count[q] += 1
        brute = total / count[:, None]
        masked = x[b] == K
        assert torch.allclose(got[b][masked].double().softmax(-1), brute[masked], atol=1e-5)
    assert mix.windows_evaluated < 2 * len(win)  # windows without a mask were skipped


def test_training_size_canvas_is_uvq_sample():
    net = tiny_prior()
    for steps in (16, 5):
        plain = sample_tokens(net, 5, steps=steps, temp=0.9, seed=3, batch_size=5)
        canvas, stats = sample_canvases(net, 5, (4, 4), steps=steps, temp=0.9, seed=3, batch_size=2)
        assert torch.equal(canvas.flatten(1), plain)
        assert stats.windows_evaluated == stats.chain_passes  # one window per canvas row
    # the chosen sampler and its options run on the canvas too
    for sampler, options in (("maskgit_cosine.v1", {"choice_temp": 2.0}), ("absorbing_top_k.v1", {"top_k": 3})):
        plain = sample_tokens(net, 3, steps=8, temp=0.9, seed=3, batch_size=3, sampler=sampler, options=options)
        canvas, _ = sample_canvases(net, 3, (4, 4), steps=8, temp=0.9, seed=3, batch_size=2, sampler=sampler,
                                    options=options)
        assert torch.equal(canvas.flatten(1), plain), sampler


def test_canvas_seed_does_not_depend_on_batch_size_and_raster_reveals_one_per_step():
    net = tiny_prior()
    a, _ = sample_canvases(net, 3, (5, 6), steps=8, temp=1.0, seed=7, batch_size=3, stride=2)
    b, _ = sample_canvases(net, 3, (5, 6), steps=8, temp=1.0, seed=7, batch_size=1, stride=2)
    assert torch.equal(a, b) and bool((a < K).all())
    c, _ = sample_canvases(net, 2, (5, 6), steps=8, temp=1.0, seed=7, batch_size=2, windows="random:2", wrap=True)
    d, _ = sample_canvases(net, 2, (5, 6), steps=8, temp=1.0, seed=7, batch_size=1, windows="random:2", wrap=True)
    assert torch.equal(c, d) and bool((c < K).all())
    r, stats = sample_canvases(net, 1, (4, 5), steps=20, temp=1.0, seed=7, options={"order": "raster"})
    assert stats.steps == 20 and stats.chain_passes == 20 and bool((r < K).all())


# ---------------------------------------------------------------------------------------------
# --wrap: windows cross the edges, and the decoded canvas tiles
# ---------------------------------------------------------------------------------------------


def test_wrapped_windows_link_the_left_and_right_edges():
    net = tiny_prior()
    canvas, window = (4, 12), (4, 4)
    x = torch.full((1, 48), K)
    x[0, 11] = 3  # a known token in the last column
    y = x.clone()
    y[0, 11] = 9
    for wrap in (False, True):
        mix = WindowMixture(network(net), make_windows(canvas, window, 1, wrap), codebook_size=K, mask_id=K)
        with torch.no_grad():
            change = (mix(x)[0, 0] - mix(y)[0, 0]).abs().max().item()  # prediction at row 0, column 0
        # without wrap no window holds both column 0 and column 11; with wrap some do
        assert (change > 1e-4) == wrap


def test_wrapped_canvas_decodes_seamlessly():
    from uvq.config import VQGANConfig
    from uvq.vqgan.model import build_vqgan

    torch.manual_seed(0)
    vc = VQGANConfig(img_size=16, nf=32, ch_mult=[1, 2], res_blocks=1, attn_resolutions=[], emb_dim=8, codebook_size=K)
    vq = build_vqgan(vc).eval()
    codes = torch.randint(0, K, (2, 8, 16))
    # The periodic reference: the decoder applied to the codes tiled 3x3, centre tile.
    reference = decode_canvas(vq, codes.repeat(1, 3, 3))[..., 16:32, 32:64]

    def seam_error(img):  # pixels on both sides of the left/right seam against the periodic reference
        cols = [0, 1, 2, 3, -4, -3, -2, -1]
        return (img[..., cols] - reference[..., cols]).abs().mean().item()

    wrapped, plain = decode_canvas(vq, codes, wrap=True), decode_canvas(vq, codes, wrap=False)
    assert wrapped.shape == plain.shape == (2, 3, 16, 32)
    assert seam_error(wrapped) < 0.5 * seam_error(plain)


# ---------------------------------------------------------------------------------------------
# `uvq upscale-canvas`: outputs, provenance, the CLI
# ---------------------------------------------------------------------------------------------


def test_upscale_canvas_writes_images_and_provenance(tmp_path):
    from uvq.images import load_rgb
    from uvq.sampling.canvas import upscale_canvas

    _, prior_ckpt = make_pair(tmp_path / "run")
    out = tmp_path / "big"
    events = []
    summary = upscale_canvas(prior_ckpt, out, size=(16, 32), n=3, steps=16, temp=0.8, seed=2, stride=2,
                             batch_size=2, device="cpu", progress=events.append)
    assert sorted(p.name for p in out.glob("sample-*.png")) == [f"sample-{i:06d}.png" for i in range(3)]
    assert load_rgb(out / "sample-000002.png").shape == (3, 16, 32)
    saved = json.loads((out / "samples.json").read_text())
    assert saved["canvas"]["latents"] == [8, 16] and saved["canvas"]["window"] == [8, 8]
    assert saved["canvas"]["windows_per_step"] == 5 and saved["steps"] == 16 and saved["seed"] == 2
    assert len(saved["prior"]["sha256"]) == 64 and saved["vqgan"]["weights"] == "model"
    assert saved["network_passes"] > 0 and summary["grid"] == str(out / "grid.png")
    assert any(e.get("task") == "canvas" and e["event"] == "advance" for e in events)
    with pytest.raises(UserError, match="--overwrite"):
        upscale_canvas(prior_ckpt, out, size=(16, 32), n=1, steps=4, device="cpu")


def test_upscale_canvas_cli_and_one_line_errors(tmp_path, capsys):
    from uvq.cli.app import main

    _, prior_ckpt = make_pair(tmp_path / "run")

    def uvq(*args):
        with pytest.raises(SystemExit) as info:
            main(list(args))
        cap = capsys.readouterr()
        return info.value.code, cap.out, cap.err

    code, out, err = uvq("upscale-canvas", "--prior", str(prior_ckpt), "--latent-size", "8x12", "--steps", "8",
                         "-n", "1", "--wrap", "--out", str(tmp_path / "c"), "--device", "cpu", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["canvas"]["pixels"] == [16, 24] and summary["canvas"]["wrap"] is True
    bad = [
        (["--latent-size", "6x16"], "smaller than the prior's 8x8 training window"),
        (["--latent-size", "8x16", "--stride", "9"], "--stride 9 is larger than the window"),
        (["--size", "15x32"], "not a multiple of the VQGAN's downsampling factor 2"),
        (["--latent-size", "8x16", "--windows", "random"], "random:M"),
        ([], "exactly one of --size"),
        (["--size", "100000x100000"], "over canvas.max_memory_gb=64"),
        (["--latent-size", "8x16", "--batch-size", "0"], "canvas.n and canvas.batch_size must be >= 1"),
        (["--latent-size", "8x16", "--temp", "1e-45"], "canvas.temp must be between 0.001 and 1000"),
        (["--latent-size", "8x16", "canvas.options.top_k=0"], "canvas.options.top_k must be an integer >= 1"),
        (["--latent-size", "8x16", "canvas.options.top_p=1.5"], "canvas.options.top_p must be a number in (0, 1]"),
        (["--latent-size", "8x16", "--order", "zigzag"], "canvas.options.order must be random or raster"),
        (["--latent-size", "8x16", "canvas.sampler=maskgit_cosine.v1", "--order", "raster"],
         "canvas.options.order is not an option of the sampler maskgit_cosine.v1"),
    ]
    for extra, message in bad:
        code, _, err = uvq("upscale-canvas", "--prior", str(prior_ckpt), "--out", str(tmp_path / "bad"),
                           "--device", "cpu", *extra)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (extra, err)
