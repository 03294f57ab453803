"""The authors' re-masking sampler and Halton ordering (extensions of the paper's sampler).

`remask.v1` against a literal transcription of the authors' `sample_mlm` loop for the same draws;
`halton.v1`'s order (a permutation, low discrepancy, Halton-MaskGIT's construction) and schedule.
The sampler contract of every registered sampler is in tests/test_sampling.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uvq.interop.reference import authors_mlm_loop
from uvq.prior.model import AbsorbingTransformer
from uvq.registry import registry
from uvq.runtime import UserError
from uvq.sampling.chain import (
    SampleRNG,
    bind_sampler,
    categorical,
    halton_order,
    remask_times,
    run_chain,
    sample_tokens,
)

K, N = 16, 16


@pytest.fixture(scope="module")
def prior() -> AbsorbingTransformer:
    torch.manual_seed(0)
    net = AbsorbingTransformer(codebook_size=K, n_tokens=N, n_embd=32, n_head=2, n_layer=2).eval()
    with torch.no_grad():  # not tiny output weights, so that samples are far from uniform
        net.head.weight.normal_(0, 1.0)
        net.pos_emb.normal_(0, 0.5)
    return net


def _predict(net):
    def predict(x):
        with torch.no_grad():
            return net(x)
    return predict


# ---------------------------------------------------------------------------------------------
# remask.v1: the authors' sample_mlm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [256, 100, 7, 1])
def test_remask_times_are_numpys_linspace(T):
    for steps in range(1, 300):
        assert remask_times(steps, T) == np.linspace(1, T, num=steps).astype(np.int64)[::-1].tolist()


@pytest.mark.parametrize("steps,T", [(N, None), (5, None), (1, None), (8, 40)])
def test_remask_equals_the_authors_loop(prior, steps, T):
    x0 = torch.full((6, N), K)
    rng = SampleRNG(7, range(6))
    ref = authors_mlm_loop(prior, x0, mask_id=K, steps=steps, temp=0.9, T=T or N,
                           uniform=lambda: rng.rand(N), draw=categorical)
    out, stats = run_chain(x0, _predict(prior), sampler="remask.v1", mask_id=K, steps=steps, temp=0.9,
                           rng=SampleRNG(7, range(6)), T=T)
    assert torch.equal(out, ref)
    assert (out != K).all() and stats["steps"] == steps
    assert stats["network_passes"] <= 6 * steps


def test_remask_equals_the_authors_loop_when_inpainting(prior):
    torch.manual_seed(1)
    x0 = torch.randint(0, K, (4, N))
    x0[:, 3:11] = K
    rng = SampleRNG(3, range(4))
    ref = authors_mlm_loop(prior, x0, mask_id=K, steps=N, temp=1.0, T=N, uniform=lambda: rng.rand(N),
                           draw=categorical)
    out, _ = run_chain(x0, _predict(prior), sampler="remask.v1", mask_id=K, steps=N, temp=1.0,
                       rng=SampleRNG(3, range(4)))
    assert torch.equal(out, ref)
    assert torch.equal(out[:, :3], x0[:, :3]) and torch.equal(out[:, 11:], x0[:, 11:])


def test_remask_redraws_a_share_tau_over_T_at_each_step():
    # A network whose argmax changes with every call: a re-drawn token differs from its old value
    # with high probability, so the share of changed tokens per step estimates tau/T.
    n, b, k, steps = 256, 16, 64, 6
    calls = [0]

    def predict(x):
        calls[0] += 1
        logits = torch.full((x.shape[0], x.shape[1], k), -30.0)
        logits[..., calls[0] % k] = 30.0  # [b, n, k], nearly one-hot on a code that moves per call
        return logits

    x0 = torch.full((b, n), k)
    chain = registry.get("samplers", "remask.v1")(x0, predict, mask_id=k, steps=steps, temp=1.0,
                                                   rng=SampleRNG(2, range(b)))
    first = next(chain)
    assert first.revealed.all()  # the first step (tau = T) draws every unknown token
    prev = first.x
    for step, tau in zip(chain, remask_times(steps, n)[1:], strict=True):
        share = (step.x != prev).float().mean().item()  # Binomial(b*n, tau/T)
        p = tau / n
        assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / (b * n)) + 1e-9, (tau, share)
        assert not step.revealed.any()
        prev = step.x


# ---------------------------------------------------------------------------------------------
# halton.v1: the order and the schedule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(1, 1), (4, 4), (16, 16), (8, 12), (3, 7), (32, 32)])
def test_halton_order_is_a_permutation(h, w):
    order = halton_order(h, w)
    assert sorted(order.tolist()) == list(range(h * w))


def test_halton_order_is_halton_maskgits():
    # valeoai/Halton-MaskGIT's build_halton_mask(4) (bases 2 and 3 from index 1, floor, first
    # occurrence kept), as (row, col) pairs written out by hand from the sequence's first points:
    # (1/2, 1/3) -> (2, 1), (1/4, 2/3) -> (1, 2), (3/4, 1/9) -> (3, 0), (1/8, 4/9) -> (0, 1), ...
    assert halton_order(4, 4).tolist()[:4] == [2 * 4 + 1, 1 * 4 + 2, 3 * 4 + 0, 0 * 4 + 1]
    assert halton_order(4, 4).tolist() == [9, 6, 12, 1, 11, 4, 14, 3, 8, 5, 0, 7, 13, 2, 15, 10]


def test_halton_order_spreads_its_first_positions():
    """Low discrepancy: the first k positions put close to k/4 in each quadrant and k/16 in each
    4x4 block, for every k. Measured as the worst block's miss averaged over k = 1..N: a random
    order misses by about sqrt(k) (checked here against random permutations)."""
    h = w = 16

    def mean_miss(order, cells):
        rows, cols = order // w, order % w
        block = (rows // (h // cells)) * cells + cols // (w // cells)  # [N], block of each position
        counts = torch.zeros(cells * cells)
        misses = []
        for k, b in enumerate(block.tolist(), 1):
            counts[b] += 1
            misses.append(float((counts - k / cells**2).abs().max()))
        return sum(misses) / len(misses)

    order = halton_order(h, w)
    assert mean_miss(order, 2) < 1.5 and mean_miss(order, 4) < 1.6  # measured 1.39 and 1.49
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        random = torch.randperm(h * w, generator=gen)
        assert mean_miss(random, 2) > 1.9 and mean_miss(random, 4) > 1.9  # the bound means something


def test_halton_order_is_deterministic_and_shared_by_samples(prior):
    x0 = torch.full((3, N), K)
    reveals = []
    for _ in range(2):
        steps_revealed = [s.revealed.clone() for s in registry.get("samplers", "halton.v1")(
            x0, _predict(prior), mask_id=K, steps=N, temp=1.0, rng=SampleRNG(0, range(3)))]
        reveals.append(torch.stack(steps_revealed))  # [S, B, N]
    assert torch.equal(reveals[0], reveals[1])
    first = reveals[0][:, 0]
    assert torch.equal(reveals[0], first[:, None].expand_as(reveals[0]))  # one order for every sample
    # at S = N one position per step, in Halton order
    assert first.sum(1).tolist() == [1] * N
    assert [int(r.nonzero()) for r in first] == halton_order(4, 4).tolist()


@pytest.mark.parametrize("steps", [1, 4, 10, 64])
def test_halton_follows_the_arccos_schedule(steps):
    n = 64
    x0 = torch.full((2, n), K)
    revealed = 0
    want = []
    for s in range(1, steps + 1):
        want.append(max(s, math.floor(n * (1 - math.acos(s / steps) / (math.pi / 2)))) if s < steps else n)
    got = []
    order = halton_order(8, 8)
    for step in registry.get("samplers", "halton.v1")(x0, lambda x: torch.zeros(x.shape[0], n, K), mask_id=K,
                                                      steps=steps, temp=1.0, rng=SampleRNG(0, range(2))):
        revealed += int(step.revealed[0].sum())
        got.append(revealed)
        known = torch.zeros(n, dtype=torch.bool)
        known[order[:revealed]] = True
        assert torch.equal(step.x[0] != K, known)  # what is revealed is a prefix of the Halton order
    assert got == [min(v, n) for v in want]


def test_halton_inpaints_in_order_among_the_unknown(prior):
    x0 = torch.randint(0, K, (2, N), generator=torch.Generator().manual_seed(3))
    unknown = torch.zeros(N, dtype=torch.bool)
    unknown[[0, 5, 6, 9, 15]] = True
    x0[:, unknown] = K
    order = [p for p in halton_order(4, 4).tolist() if unknown[p]]
    seen = []
    for step in registry.get("samplers", "halton.v1")(x0, _predict(prior), mask_id=K, steps=5, temp=1.0,
                                                      rng=SampleRNG(1, range(2))):
        seen += [int(p) for p in step.revealed[0].nonzero().flatten()]
        assert torch.equal(step.x[:, ~unknown], x0[:, ~unknown])
    assert seen == order


def test_halton_needs_a_shape_for_a_non_square_grid():
    x0 = torch.full((1, 12), K)
    chain = registry.get("samplers", "halton.v1")
    with pytest.raises(UserError, match=r"options.shape=\[h, w\]"):
        next(chain(x0, lambda x: torch.zeros(1, 12, K), mask_id=K, steps=4, temp=1.0, rng=SampleRNG(0, [0])))
    with pytest.raises(UserError, match="does not hold"):
        next(chain(x0, lambda x: torch.zeros(1, 12, K), mask_id=K, steps=4, temp=1.0, rng=SampleRNG(0, [0]),
                   shape=[3, 5]))
    out, _ = run_chain(x0, lambda x: torch.zeros(1, 12, K), sampler="halton.v1", mask_id=K, steps=4, temp=1.0,
                       rng=SampleRNG(0, [0]), shape=[3, 4])
    assert (out != K).all()


# ---------------------------------------------------------------------------------------------
# Options from the recipe
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options,match", [
    ("remask.v1", {"T": 0}, "sample.options.T must be an integer >= 1"),
    ("remask.v1", {"T": 2.5}, "sample.options.T must be an integer >= 1"),
    ("halton.v1", {"shape": [4]}, r"sample.options.shape must be two integers"),
    ("halton.v1", {"shape": [4, 0]}, r"sample.options.shape must be two integers"),
    ("halton.v1", {"T": 3}, "sample.options.T is not an option of the sampler halton.v1; its options: shape, top_k, top_p"),
    ("remask.v1", {"order": "raster"}, "is not an option of the sampler remask.v1; its options: T, top_k, top_p"),
])
def test_bad_options_are_refused_with_one_line(name, options, match):
    with pytest.raises(UserError, match=match):
        bind_sampler(name, options)


@pytest.mark.parametrize("name", ["remask.v1", "halton.v1"])
def test_new_samplers_are_batch_size_invariant(prior, name):
    runs = [sample_tokens(prior, 5, steps=6, temp=0.9, seed=3, batch_size=bs, sampler=name) for bs in (5, 2)]
    assert torch.equal(runs[0], runs[1]) and (runs[0] < K).all()


@pytest.mark.parametrize("name", ["remask.v1", "halton.v1"])
def test_new_samplers_run_on_the_canvas_and_in_inpainting(prior, name):
    from uvq.sampling.canvas import sample_canvases
    from uvq.sampling.inpaint import inpaint_tokens

    # a canvas of the training size is `uvq sample`
    plain = sample_tokens(prior, 3, steps=8, temp=0.9, seed=3, batch_size=3, sampler=name)
    canvas, _ = sample_canvases(prior, 3, (4, 4), steps=8, temp=0.9, seed=3, batch_size=2, sampler=name)
    assert torch.equal(canvas.flatten(1), plain)
    # a wider canvas (halton.v1 told its grid) is filled completely
    options = {"shape": [4, 8]} if name == "halton.v1" else {}
    wide, _ = sample_canvases(prior, 2, (4, 8), steps=8, temp=0.9, seed=3, sampler=name, options=options)
    assert (wide < K).all()
    # inpainting is the chain from t_start on the partly known grid
    known = torch.randint(0, K, (4, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2] = True
    result = inpaint_tokens(prior, known, mask, n=3, steps=12, temp=0.9, seed=5, sampler=name)
    x = torch.where(mask, torch.full_like(known, K), known).flatten()[None].expand(3, -1).contiguous()
    direct, _ = run_chain(x, _predict(prior), sampler=name, mask_id=K, steps=12, temp=0.9,
                          rng=SampleRNG(5, [0, 1, 2]), t_start=6)
    assert result.t_start == 6 and torch.equal(result.tokens.flatten(1), direct)
    assert torch.equal(result.tokens[:, ~mask], known[~mask].expand(3, -1))


def test_sample_cli_takes_the_new_samplers_from_the_recipe(tmp_path):
    from conftest import run_uvq
    from test_sampling import make_checkpoints

    make_checkpoints(tmp_path / "run")
    for name, extra in (("remask.v1", ["sample.options.T=32"]), ("halton.v1", [])):
        out = tmp_path / name
        res = run_uvq("sample", "--run-dir", str(tmp_path / "run"), "-n", "2", "--steps", "4",
                      f"sample.sampler={name}", *extra, "--out", str(out), "--device", "cpu")
        assert res.returncode == 0, res.stderr
        assert f"sampler={name}" in res.stderr
        assert len(list(out.glob("sample-*.png"))) == 2
