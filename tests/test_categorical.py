"""Exact categorical draws (docs/sampling.md, "Exact draws"): 53-bit uniforms and a float64 CDF.

A float32 CDF has a spacing of 2**-24 (about 6e-8) near 1, so a code rarer than that is never
drawn (Zheng et al., ICLR 2025). These tests draw from distributions full of such codes and check
the frequencies against binomial bounds, the empirical entropy against the distribution's, and
that the draws of a sample do not depend on the batch it is drawn in.
"""

from __future__ import annotations

import math

import torch
from scipy.stats import binom

from uvq.prior.model import AbsorbingTransformer
from uvq.sampling.chain import SampleRNG, categorical, sample_tokens


def _draw(logits: torch.Tensor, n: int, seed: int, chunk: int = 8192) -> torch.Tensor:
    """n draws [n] from softmax(logits [K]) with uniforms of SampleRNG(seed, [0]), in chunks."""
    rng = SampleRNG(seed, [0])
    out = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        out.append(categorical(logits.expand(m, -1), rng.rand(m)[0]))
    return torch.cat(out)


def _binomial_interval(n: int, p: float, alpha: float = 1e-6) -> tuple[int, int]:
    return int(binom.ppf(alpha / 2, n, p)), int(binom.isf(alpha / 2, n, p))


def test_uniforms_have_53_bits():
    u = SampleRNG(3, range(4)).rand(10_000)  # [4, 10000]
    assert u.dtype == torch.float64 and u.min() >= 0 and u.max() < 1
    bits = (u * 2.0 ** 53).flatten()
    assert torch.equal(bits, bits.floor())  # multiples of 2**-53
    low = (bits.to(torch.int64) & ((1 << 29) - 1)).double() / 2 ** 29  # the 29 bits below a float32's 24
    assert (low > 0).float().mean() > 0.99
    assert abs(low.mean().item() - 0.5) < 0.01 and abs(low.var().item() - 1 / 12) < 0.005
    hi = u.flatten()[:-1] * 2 ** 24 - (u.flatten()[:-1] * 2 ** 24).floor()
    assert abs(torch.corrcoef(torch.stack([hi, u.flatten()[1:]]))[0, 1].item()) < 0.02


def test_codes_below_float32_resolution_are_drawn_at_their_frequency():
    # one likely code and 1024 codes of probability 5.9e-8 each (below float32's 6e-8 near 1)
    k_tiny, p_tiny = 1024, 5.9e-8
    logits = torch.full((k_tiny + 1,), math.log(p_tiny))
    logits[0] = 0.0
    p = logits.double().softmax(-1)
    assert p[1:].max() < 6e-8
    # a float32 CDF quantises each tiny step to a multiple of 2**-24: some codes never drawn, others too often
    steps32 = logits.softmax(-1).cumsum(-1).diff().double() * 2 ** 24
    assert torch.equal(steps32, steps32.round()) and bool((steps32 == 0).any())
    n = 200_000  # about 12 tail draws expected
    draws = _draw(logits, n, seed=11, chunk=4096)
    tail = int((draws > 0).sum())
    lo, hi = _binomial_interval(n, float(p[1:].sum()))
    assert lo <= tail <= hi, (tail, lo, hi)
    assert tail > 0  # P(no tail draw) = exp(-12) for an exact sampler
    # the tail codes are spread over the tiny codes, not piled on a few (each one at most a few times)
    assert torch.bincount(draws[draws > 0]).max() <= _binomial_interval(n, p_tiny, 1e-3)[1] + 1


def test_mixed_scales_frequencies_within_binomial_bounds():
    # probabilities spanning 0.3 .. 1e-5 per code, each code checked on its own
    logits = torch.cat([torch.tensor([0.0, -0.5, -1.0]), torch.linspace(-4, -10, 61)])
    p = logits.double().softmax(-1)
    n = 300_000
    counts = torch.bincount(_draw(logits, n, seed=5), minlength=len(p))
    alpha = 1e-6 / len(p)  # Bonferroni over the codes
    for k in range(len(p)):
        lo, hi = _binomial_interval(n, float(p[k]), alpha)
        assert lo <= int(counts[k]) <= hi, (k, int(counts[k]), lo, hi)


def test_empirical_entropy_at_temperature_one_matches_the_distribution():
    torch.manual_seed(0)
    logits = torch.randn(256) * 3.0  # a long tail: the smallest probabilities are far below 1e-6
    logp = logits.double().log_softmax(-1)
    entropy = float(-(logp.exp() * logp).sum())
    n = 100_000
    draws = _draw(logits, n, seed=2)
    surprisal = -logp[draws]  # [n]; its mean is an unbiased estimate of the entropy
    se = float(surprisal.std() / math.sqrt(n))
    assert abs(float(surprisal.mean()) - entropy) < 5 * se, (float(surprisal.mean()), entropy, se)
    # the plug-in entropy of the draws, with the Miller-Madow bias correction, agrees too
    freq = torch.bincount(draws, minlength=256).double() / n
    seen = freq[freq > 0]
    plug_in = float(-(seen * seen.log()).sum()) + (len(seen) - 1) / (2 * n)
    assert abs(plug_in - entropy) < 0.01


def test_draws_are_batch_size_invariant():
    torch.manual_seed(1)
    logits = torch.randn(12, 40) * 4
    u = SampleRNG(9, range(12)).rand(1)[:, 0]  # [12]
    together = categorical(logits, u)
    alone = torch.cat([categorical(logits[i:i + 1], u[i:i + 1]) for i in range(12)])
    assert torch.equal(together, alone)
    # whole chains: a fixed seed gives the same tokens whatever the batch size
    torch.manual_seed(0)
    net = AbsorbingTransformer(codebook_size=16, n_tokens=16, n_embd=32, n_head=2, n_layer=1).eval()
    runs = [sample_tokens(net, 6, steps=8, temp=1.0, seed=4, batch_size=bs, precision="fp32") for bs in (6, 4, 1)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    # and the uniforms of a sample are the same in a sub-batch and at a later start of the counter
    full = SampleRNG(4, range(6))
    a = full.rand(16)
    assert torch.equal(SampleRNG(4, [5, 2]).rand(16), a[[5, 2]])


def test_top_of_the_unit_interval_draws_a_value_of_positive_probability():
    top = torch.full((3,), 1.0 - 2.0 ** -53, dtype=torch.float64)
    logits = torch.tensor([[0.0, -30.0, float("-inf")]] * 3)
    assert (categorical(logits, top) == 1).all()
