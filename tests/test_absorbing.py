"""The absorbing process: masking, time sampling, loss weights and the ELBO, checked against
closed forms, brute-force enumeration and distributions of known entropy."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from uvq.prior.absorbing import (
    PRIOR_LOSSES,
    AbsorbingDiffusion,
    elbo_full_sum,
    elbo_monte_carlo,
    masked_cross_entropy,
    reweighted_elbo_scale,
    start_time_for_masked,
)
from uvq.prior.model import AbsorbingTransformer
from uvq.registry import registry
from uvq.runtime import UserError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class UniformLogits:
    """A prior that knows nothing: equal logits for every code."""

    def __init__(self, K: int) -> None:
        self.mask_id = K
        self.K = K

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*x.shape, self.K)


class FixedLogits:
    """Logits that depend on position only (a fixed, non-uniform 'model')."""

    def __init__(self, logits: torch.Tensor) -> None:  # [N,K]
        self.logits = logits
        self.mask_id = logits.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, -1)


def tiny_transformer(N: int, K: int, seed: int, head_scale: float = 1.0) -> AbsorbingTransformer:
    torch.manual_seed(seed)
    model = AbsorbingTransformer(codebook_size=K, n_tokens=N, n_embd=16, n_head=2, n_layer=1).eval()
    with torch.no_grad():
        model.pos_emb.normal_(0, 1.0)
        model.head.weight.mul_(head_scale)  # sharper logits, so that CE depends strongly on the mask
    return model


# ---------------------------------------------------------------------------------------------
# q(x_t | x_0)
# ---------------------------------------------------------------------------------------------


def test_random_masking_frequency_is_t_over_T():
    N, T, B = 64, 40, 400
    process = AbsorbingDiffusion(N, 32, T=T)
    x0 = torch.randint(0, 32, (B, N), generator=gen(1))
    for t_value in (1, 7, 20, 33, 40):
        t = torch.full((B,), t_value)
        x_t, mask = process.q_sample(x0, t, gen(t_value))
        assert torch.equal(x_t[mask], torch.full_like(x_t[mask], 32)) and torch.equal(x_t[~mask], x0[~mask])
        p = t_value / T
        sigma = math.sqrt(p * (1 - p) / (B * N)) + 1e-12
        assert abs(mask.float().mean().item() - p) <= 4 * sigma + (1e-12 if p == 1 else 0)
        # no position is favoured: per-position frequencies spread like binomials around p
        if 0 < p < 1:
            per_pos = mask.float().mean(0)
            assert (per_pos - p).abs().max() < 5 * math.sqrt(p * (1 - p) / B)


def test_fixed_masking_masks_exactly_round_t_over_T_times_N():
    N, B = 50, 300
    for T in (50, 64):
        process = AbsorbingDiffusion(N, 16, T=T, masking="fixed")
        x0 = torch.randint(0, 16, (B, N), generator=gen(2))
        t = torch.randint(1, T + 1, (B,), generator=gen(3))
        _, mask = process.q_sample(x0, t, gen(4))
        expected = torch.tensor([max(1, round(ti / T * N)) for ti in t.tolist()])
        assert torch.equal(mask.sum(1), expected)
    # the chosen positions are uniform: at t = T/2 every position is masked half of the time
    process = AbsorbingDiffusion(N, 16, T=N, masking="fixed")
    _, mask = process.q_sample(torch.zeros(4000, N, dtype=torch.long), torch.full((4000,), N // 2), gen(5))
    assert (mask.float().mean(0) - 0.5).abs().max() < 5 * math.sqrt(0.25 / 4000)


def test_start_time():
    assert start_time_for_masked(0, 256, 256) == 0
    assert start_time_for_masked(256, 256, 256) == 256
    assert start_time_for_masked(77, 256, 256) == 77
    assert start_time_for_masked(64, 256, 100) == 25
    assert start_time_for_masked(1, 256, 100) == 0


# ---------------------------------------------------------------------------------------------
# Loss weights (Eq. 6, Eq. 7, the authors' code, MLM)
# ---------------------------------------------------------------------------------------------


def test_loss_weights_at_known_t_equal_the_formulas():
    T, N = 256, 256
    ce = torch.tensor([3.0, 3.0, 3.0, 3.0])
    n = torch.tensor([5, 5, 5, 0])
    t = torch.tensor([1, 128, 256, 256])
    L = lambda name: registry.get("prior_losses", name)(ce, n, t, T, N)  # noqa: E731
    nats_to_bpt = 1 / (N * math.log(2))
    torch.testing.assert_close(L("elbo.v1"), torch.tensor([256.0, 2.0, 1.0, 1.0]) * 3 * nats_to_bpt)
    Z = 257 * 258 / (6 * 256)
    torch.testing.assert_close(L("reweighted_elbo.v1"), torch.tensor([256.0, 129.0, 1.0, 1.0]) / Z * 3 * nats_to_bpt)
    torch.testing.assert_close(L("reweighted_elbo_official.v1"), torch.tensor([255 / 256, 0.5, 0.0, 0.0]) * 3 * nats_to_bpt)
    torch.testing.assert_close(L("mlm.v1"), torch.tensor([3 / 5, 3 / 5, 3 / 5, 3.0]) / math.log(2))


def test_training_loss_matches_an_independent_computation():
    N, K, B = 12, 7, 6
    torch.manual_seed(3)
    model = FixedLogits(torch.randn(N, K))
    x0 = torch.randint(0, K, (B, N), generator=gen(9))
    logp = torch.log_softmax(model.logits, -1)  # [N,K]
    for name in PRIOR_LOSSES:
        process = AbsorbingDiffusion(N, K, T=20)
        out = process.training_loss(model, x0, name, gen(10))
        # replay the same draws: t first, then the mask
        g = gen(10)
        t = torch.randint(1, 21, (B,), generator=g)
        mask = torch.rand(B, N, generator=g) < t.unsqueeze(1) / 20
        assert torch.equal(out["t"], t)
        ce = torch.tensor([sum(-logp[i, x0[b, i]].item() for i in range(N) if mask[b, i]) for b in range(B)])
        n = mask.sum(1).double()
        tt = t.double()
        expected = {
            "elbo.v1": 20 / tt * ce / (N * math.log(2)),
            "reweighted_elbo.v1": (21 - tt) / reweighted_elbo_scale(20) * ce / (N * math.log(2)),
            "reweighted_elbo_official.v1": (1 - tt / 20) * ce / (N * math.log(2)),
            "mlm.v1": ce / n.clamp(min=1) / math.log(2),
        }[name]
        torch.testing.assert_close(out["loss_t"].double(), expected.double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["loss"].double(), expected.mean().double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["elbo"].double(), (20 / tt * ce / (N * math.log(2))).mean().double(),
                                   rtol=1e-5, atol=1e-6)


def test_uniform_logits_score_log2_K_in_closed_form():
    # With T = N and fixed masking, t tokens are masked at step t, each costing ln K: every
    # ELBO-like loss then has an exact expectation over t, which our scales make log2 K.
    N, K = 32, 16
    model = UniformLogits(K)
    x0 = torch.randint(0, K, (3, N), generator=gen(11))
    fixed = AbsorbingDiffusion(N, K, masking="fixed")
    torch.testing.assert_close(fixed.elbo_full_sum(model, x0, gen(12)), torch.full((3,), 4.0))
    t = torch.arange(1, N + 1).double()
    ce = t * math.log(K)
    for name in ("elbo.v1", "reweighted_elbo.v1"):
        mean = registry.get("prior_losses", name)(ce, t, t, N, N).mean().item()
        assert mean == pytest.approx(math.log2(K), rel=1e-12)
    # the authors' scale: (1/T) sum_t (1 - t/T) t/T log2 K = (T^2 - 1) / (6 T^2) log2 K
    official = registry.get("prior_losses", "reweighted_elbo_official.v1")(ce, t, t, N, N).mean().item()
    assert official == pytest.approx((N * N - 1) / (6 * N * N) * math.log2(K), rel=1e-12)
    # random masking: an unbiased estimate of log2 K
    mean, se = elbo_monte_carlo(model, x0, 400, gen(13))
    assert ((mean - 4.0).abs() < 4 * se).all()


def test_untrained_prior_is_close_to_log2_K():
    torch.manual_seed(4)
    model = AbsorbingTransformer(codebook_size=64, n_tokens=64, n_embd=32, n_head=2, n_layer=2).eval()
    x0 = torch.randint(0, 64, (16, 64), generator=gen(14))
    elbo = elbo_full_sum(model, x0, gen(15))
    assert abs(elbo.mean().item() - 6.0) < 0.05


# ---------------------------------------------------------------------------------------------
# The ELBO estimators against brute-force enumeration of every mask
# ---------------------------------------------------------------------------------------------


def exact_elbo(model, x0: torch.Tensor, T: int) -> torch.Tensor:
    """sum_t (1/t) sum_M q(M|t) CE(M), enumerating all 2^N masks, in bits per token. [B]"""
    B, N = x0.shape
    masks = torch.tensor(list(itertools.product([False, True], repeat=N)))  # [2^N,N]
    size = masks.sum(1).double()
    out = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        rows = x0[b].expand(len(masks), N)
        x_t = torch.where(masks, torch.full_like(rows, model.mask_id), rows)
        with torch.no_grad():
            ce = masked_cross_entropy(model(x_t), rows, masks).double()  # [2^N]
        for t in range(1, T + 1):
            p = t / T
            q = p ** size * (1 - p) ** (N - size)
            out[b] += (q * ce).sum() / t
    return out / (N * math.log(2))


def test_full_sum_and_monte_carlo_agree_with_the_exact_elbo():
    N, K, T = 8, 5, 8
    model = tiny_transformer(N, K, seed=5, head_scale=40.0)
    x0 = torch.randint(0, K, (2, N), generator=gen(16))
    exact = exact_elbo(model, x0, T)
    assert (exact > math.log2(K) * 0.5).all()  # a sharp model: far from uniform, so the test has teeth

    # full sum: repeat it to measure its own spread (it has one masking draw per t)
    repeats = torch.stack([elbo_full_sum(model, x0, gen(100 + r)) for r in range(300)]).double()  # [R,B]
    fs_mean, fs_se = repeats.mean(0), repeats.std(0) / math.sqrt(len(repeats))
    mc_mean, mc_se = elbo_monte_carlo(model, x0, 6000, gen(17))
    mc_mean, mc_se = mc_mean.double(), mc_se.double()
    assert ((fs_mean - exact).abs() < 4 * fs_se).all(), (fs_mean, exact, fs_se)
    assert ((mc_mean - exact).abs() < 4 * mc_se).all(), (mc_mean, exact, mc_se)
    assert ((fs_mean - mc_mean).abs() < 4 * (fs_se**2 + mc_se**2).sqrt()).all()
    # the same thing with the T argument different from N
    exact16 = exact_elbo(model, x0, 16)
    mc16, se16 = elbo_monte_carlo(model, x0, 6000, gen(18), T=16)
    assert ((mc16.double() - exact16).abs() < 4 * se16.double()).all()


# ---------------------------------------------------------------------------------------------
# Importance sampling of t
# ---------------------------------------------------------------------------------------------


def test_importance_sampling_draws_sqrt_history_with_matching_weights():
    T = 10
    process = AbsorbingDiffusion(10, 4, T=T, time_sampling="importance")
    t, w = process.sample_time(100, torch.device("cpu"), gen(19))
    assert torch.equal(w, torch.ones(100))  # warm-up: uniform until every t was seen > 10 times
    history = torch.tensor([0.0] + [float(t_) ** 2 for t_ in range(1, T + 1)], dtype=torch.float64)
    process.load_state_dict({"Lt_history": history, "Lt_count": torch.full((T + 1,), 11.0),
                             "loss_history": torch.zeros(T + 1)})
    p = process.time_probabilities()
    expected = (torch.arange(1, T + 1).double() + 1e-4)
    torch.testing.assert_close(p, expected / expected.sum(), rtol=1e-6, atol=1e-9)
    t, w = process.sample_time(200_000, torch.device("cpu"), gen(20))
    freq = torch.bincount(t, minlength=T + 1)[1:].double() / len(t)
    assert (freq - p).abs().max() < 5 * math.sqrt(p.max() / len(t))
    torch.testing.assert_close(w.double(), 1 / (T * p[t - 1]), rtol=1e-6, atol=0)
    # the weighted mean of any f(t) estimates its uniform mean
    f = torch.arange(1, T + 1).double().pow(-1.0)
    assert (w.double() * f[t - 1]).mean().item() == pytest.approx(f.mean().item(), rel=0.01)


def test_tracker_state_round_trips_and_checks_T():
    N, K = 8, 5
    model = tiny_transformer(N, K, seed=6)
    process = AbsorbingDiffusion(N, K, time_sampling="importance")
    x0 = torch.randint(0, K, (64, N), generator=gen(21))
    for _ in range(3):
        process.training_loss(model, x0, "elbo.v1", gen(22))
    state = process.state_dict()
    assert state["Lt_count"].sum() == 3 * 64 and state["Lt_count"][0] == 0
    again = AbsorbingDiffusion(N, K, time_sampling="importance")
    again.load_state_dict(state)
    assert torch.equal(again.Lt_history, process.Lt_history) and again.importance_ready() == process.importance_ready()
    with pytest.raises(UserError, match="same prior_train.T"):
        AbsorbingDiffusion(N, K, T=9).load_state_dict(state)
    buckets = process.loss_by_time(4)
    assert [b["t_lo"] for b in buckets] == [1, 3, 5, 7] and all(b["loss"] > 0 for b in buckets)


def test_same_generator_same_loss():
    model = tiny_transformer(8, 5, seed=7)
    x0 = torch.randint(0, 5, (4, 8), generator=gen(23))
    a = AbsorbingDiffusion(8, 5).training_loss(model, x0, "reweighted_elbo.v1", gen(24))
    b = AbsorbingDiffusion(8, 5).training_loss(model, x0, "reweighted_elbo.v1", gen(24))
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["t"], b["t"])
    with pytest.raises(UserError, match="valid names"):
        AbsorbingDiffusion(8, 5).training_loss(model, x0, "elbo.v9", gen(24))


# ---------------------------------------------------------------------------------------------
# Training on data of known entropy: the ELBO falls, but never below the entropy
# ---------------------------------------------------------------------------------------------


def _train(data_fn, N: int, K: int, steps: int, loss: str, seed: int) -> AbsorbingTransformer:
    torch.manual_seed(seed)
    model = AbsorbingTransformer(codebook_size=K, n_tokens=N, n_embd=32, n_head=2, n_layer=2)
    process = AbsorbingDiffusion(N, K)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = gen(seed)
    for _ in range(steps):
        out = process.training_loss(model, data_fn(64, g), loss, g)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    return model.eval()


def _elbo_over_images(model, x0: torch.Tensor, seed: int) -> tuple[float, float]:
    """Mean ELBO over images and its standard error across images (data and draws together)."""
    per_image, _ = elbo_monte_carlo(model, x0, 16, gen(seed))
    return per_image.mean().item(), per_image.std().item() / math.sqrt(len(per_image))


def test_training_on_a_mixture_of_grids_approaches_but_never_beats_its_entropy():
    N, K = 16, 8
    grids = torch.randint(0, K, (4, N), generator=gen(30))  # four fixed grids, equally likely
    entropy = math.log2(4) / N  # 0.125 bits per token

    def data(b, g):
        return grids[torch.randint(0, 4, (b,), generator=g)]

    model = _train(data, N, K, steps=250, loss="reweighted_elbo.v1", seed=31)
    mean, se = _elbo_over_images(model, data(512, gen(32)), 33)
    assert mean < 0.25 * math.log2(K), mean  # well below the 3 bits of an untrained prior
    assert mean > entropy - 4 * se, (mean, entropy, se)


def test_iid_tokens_elbo_stays_above_their_entropy():
    N, K = 16, 8
    probs = torch.tensor([0.4, 0.2, 0.1, 0.1, 0.08, 0.06, 0.04, 0.02])
    entropy = -(probs * probs.log2()).sum().item()  # bits per token; nothing to learn across positions

    def data(b, g):
        return torch.multinomial(probs, b * N, replacement=True, generator=g).view(b, N)

    model = _train(data, N, K, steps=150, loss="elbo.v1", seed=34)
    mean, se = _elbo_over_images(model, data(1024, gen(35)), 36)
    assert mean > entropy - 4 * se, (mean, entropy, se)
    assert mean < entropy + 0.15, (mean, entropy)  # and it did learn the marginal (3 bits untrained)
