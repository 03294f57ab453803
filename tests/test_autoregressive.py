"""The autoregressive baseline (issue 12 item 1): a causal network, its exact NLL, its sampler.

The likelihood check uses token grids from a first-order Markov chain along the raster order, whose
entropy per token is computed exactly: the trained AR prior's exact NLL must approach it and never
fall below it by more than its standard error, and the absorbing prior's ELBO on the same data,
reported beside it, must stay above it (a bound on the NLL).
"""

from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch

from uvq.config import ConfigError, PriorConfig, load_config
from uvq.prior.autoregressive import AutoregressiveProcess, refuse_autoregressive
from uvq.prior.latents import write_latents
from uvq.prior.likelihood import evaluate_elbo
from uvq.prior.model import AbsorbingTransformer
from uvq.prior.train import fit_prior
from uvq.registry import registry
from uvq.runtime import UserError
from uvq.sampling.autoregressive import autoregressive_tokens
from uvq.sampling.chain import SampleRNG, make_filter, sample_tokens

K, H, W = 4, 4, 4
N = H * W


def _tiny(causal: bool = True, n_tokens: int = N, k: int = K) -> AbsorbingTransformer:
    torch.manual_seed(0)
    net = AbsorbingTransformer(codebook_size=k, n_tokens=n_tokens, n_embd=32, n_head=2, n_layer=2, causal=causal)
    for p in net.parameters():  # larger weights than the N(0, 0.02) start: a distribution far from uniform
        p.data.normal_(0.0, 0.3)
    return net.eval()


# ---------------------------------------------------------------------------------------------
# The network: causal, cached forward equal to the full one, same parameters as the absorbing one
# ---------------------------------------------------------------------------------------------


def test_causal_network_sees_only_earlier_positions_and_the_cache_agrees():
    net = _tiny()
    x = torch.randint(0, K, (3, N))
    with torch.no_grad():
        full = net(x)  # [3, N, K]
        for j in (0, 5, N - 1):
            y = x.clone()
            y[:, j] = (y[:, j] + 1) % K
            changed = (net(y) - full).abs().amax((0, 2))  # [N]
            assert torch.all(changed[: j + 1] == 0) and (j == N - 1 or changed[j + 1:].max() > 1e-3)
        inputs = torch.cat([torch.full((3, 1), K), x[:, :-1]], 1)  # the start token, then x shifted
        cache = net.new_cache()
        steps = torch.cat([net.forward_cached(inputs[:, i:i + 1], cache) for i in range(N)], 1)
        cache = net.new_cache()
        prefill = torch.cat([net.forward_cached(inputs[:, :7], cache)] +
                            [net.forward_cached(inputs[:, i:i + 1], cache) for i in range(7, N)], 1)
    assert torch.allclose(steps, full, atol=1e-5) and torch.allclose(prefill, full, atol=1e-5)
    bidirectional = _tiny(causal=False)
    assert [n for n, _ in bidirectional.named_parameters()] == [n for n, _ in net.named_parameters()]
    with pytest.raises(ValueError, match="causal"):
        bidirectional.new_cache()


def test_exact_nll_is_a_normalised_distribution():
    """Brute force over all K^N sequences of a 3-token prior: sum_x 2^(-N nll(x)) = 1."""
    net = _tiny(n_tokens=3, k=3)
    process = AutoregressiveProcess(n_tokens=3, codebook_size=3)
    xs = torch.tensor(list(itertools.product(range(3), repeat=3)))  # [27, 3]
    bits = process.nll(net, xs).double() * 3  # [27] -log2 p(x)
    assert float((2.0 ** -bits).sum()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UserError, match="causal"):
        process.nll(_tiny(causal=False, n_tokens=3, k=3), xs)


# ---------------------------------------------------------------------------------------------
# The sampler: cached == uncached for the same draws, batch-size invariant, filters apply
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temp,top_k,top_p", [(1.0, None, None), (0.7, 3, None), (1.3, None, 0.8)])
def test_cached_sampler_gives_the_uncached_tokens(temp, top_k, top_p):
    net = _tiny()
    x = torch.full((6, N), K)
    x[1, :5] = torch.tensor([0, 1, 2, 3, 0])  # a known prefix is kept and conditioned on
    outs = []
    with torch.no_grad():
        for cache in (True, False):
            tokens, stats = autoregressive_tokens(net, x, temp=temp, rng=SampleRNG(7, range(6)),
                                                  filter=make_filter(top_k, top_p), cache=cache)
            outs.append(tokens)
            assert stats["steps"] == N
    assert torch.equal(outs[0], outs[1])
    assert (outs[0] < K).all() and torch.equal(outs[0][1, :5], x[1, :5])
    assert len({tuple(r) for r in outs[0].tolist()}) > 3  # the draws differ between samples
    if top_k == 3:  # the filtered-out code of each step is never drawn
        with torch.no_grad():
            logits = net(outs[0])  # [6, N, K]: the logits each position was drawn from
        drawn = x == K  # the known prefix was not drawn
        assert not (outs[0] == logits.argmin(-1))[drawn].any()


def test_sampling_is_batch_size_invariant_and_refuses_absorbing_settings():
    net = _tiny()
    a = sample_tokens(net, 7, temp=1.0, seed=3, batch_size=7, precision="fp32")
    b = sample_tokens(net, 7, temp=1.0, seed=3, batch_size=2, precision="fp32")
    assert torch.equal(a, b) and a.shape == (7, N)
    with pytest.raises(UserError, match="one token per step"):
        sample_tokens(net, 2, steps=4, temp=1.0)
    with pytest.raises(UserError, match="absorbing-chain sampler"):
        sample_tokens(net, 2, temp=1.0, sampler="maskgit_cosine.v1")
    with pytest.raises(UserError, match="options.order"):
        sample_tokens(net, 2, temp=1.0, options={"order": "raster"})
    with pytest.raises(UserError, match="section 4.5"):
        refuse_autoregressive("inpaint", prior=net)


def test_recipe_pairs_the_process_with_the_network():
    with pytest.raises(ConfigError, match="model.prior.causal: true"):
        load_config(None, ["prior_train.process=autoregressive.v1"])
    with pytest.raises(ConfigError, match="model.prior.causal: false"):
        load_config(None, ["model.prior.causal=true"])
    with pytest.raises(UserError, match="valid names"):
        load_config(None, ["prior_train.process=autoregresive.v1"])
    with pytest.raises(ConfigError, match="sample.steps=null"):
        load_config("demo", ["prior_train.process=autoregressive.v1", "model.prior.causal=true"])
    cfg = load_config(None, ["prior_train.process=autoregressive.v1", "model.prior.causal=true"])
    process = registry.get("processes", cfg.prior_train.process)(cfg.model.prior, cfg.prior_train)
    assert isinstance(process, AutoregressiveProcess) and PriorConfig().causal is False


# ---------------------------------------------------------------------------------------------
# Markov-chain tokens: exact entropy; AR NLL approaches it, the absorbing ELBO stays above it
# ---------------------------------------------------------------------------------------------

# x_0 uniform; x_i | x_{i-1} = j is (j + 1) mod K with probability 0.8, another code otherwise.
P_STAY = 0.8
TRANSITION = np.full((K, K), (1 - P_STAY) / (K - 1))
for _j in range(K):
    TRANSITION[_j, (_j + 1) % K] = P_STAY
START = np.full(K, 1.0 / K)


def markov_entropy_bits_per_token() -> float:
    """H(x_0) + sum_{i>=1} sum_j P(x_{i-1} = j) H(T[j]), over N: exact, by propagating the marginals."""
    def h(p):
        return float(-(p * np.log2(p)).sum())

    total, marginal = h(START), START
    for _ in range(1, N):
        total += float(marginal @ np.array([h(row) for row in TRANSITION]))
        marginal = marginal @ TRANSITION
    return total / N


def _markov_grids(n: int, rng: np.random.Generator, prefix: str) -> list[tuple[str, np.ndarray]]:
    out = []
    for i in range(n):
        seq = [rng.choice(K, p=START)]
        for _ in range(1, N):
            seq.append(rng.choice(K, p=TRANSITION[seq[-1]]))
        out.append((f"{prefix}{i:05d}", np.array(seq).reshape(H, W)))  # raster order
    return out


@pytest.fixture(scope="module")
def markov(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("markov")
    write_latents(root, {"train": _markov_grids(2048, rng, "t"), "val": _markov_grids(256, rng, "v")},
                  codebook_size=K, shard_size=1024)
    return root


TINY = ["model.prior.n_embd=32", "model.prior.n_head=2", "model.prior.n_layer=2", f"model.prior.codebook_size={K}",
        f"model.prior.latent_shape=[{H},{W}]", f"model.vqgan.codebook_size={K}", "model.vqgan.img_size=64",
        "prior_train.batch_size=32", "prior_train.lr=0.003", "prior_train.warmup_steps=20", "prior_train.steps=300",
        "prior_train.val_every=150", "prior_train.val_batches=8", "prior_train.ema_beta=0.9",
        "prior_train.ema_every=1", "run.log_every=50", "run.image_every=1000", "run.ckpt_every=1000"]
AR = ["prior_train.process=autoregressive.v1", "model.prior.causal=true"]


def test_ar_nll_approaches_the_markov_entropy_and_the_elbo_bounds_it(tmp_path, markov, uvq_cli):
    entropy = markov_entropy_bits_per_token()
    assert 1.0 < entropy < math.log2(K)
    summary = fit_prior(load_config(None, [*TINY, *AR]), markov, tmp_path / "ar", device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "ar" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_nll_bits_per_token"] for r in rows if "val_nll_bits_per_token" in r]
    assert len(vals) == 2 and summary["best"]["val_bits_per_token"] == min(vals)
    meta = json.loads(((tmp_path / "ar" / "checkpoints" / "best").resolve() / "meta.json").read_text())
    assert meta["config"]["prior_train"]["process"] == "autoregressive.v1" and meta["model_config"]["causal"]

    # `uvq eval elbo` on the AR prior: the exact NLL, per image, stderr column 0 (no estimator noise).
    res = uvq_cli("eval", "elbo", "--prior", str(tmp_path / "ar"), "--latents", str(markov), "--out",
                  str(tmp_path / "eval"), "--json", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    ar = json.loads(res.stdout)
    per_image = [float(r["bits_per_token"]) for r in csv.DictReader((tmp_path / "eval" / "elbo.csv").open())]
    assert ar["metric"] == "negative log-likelihood (exact)" and ar["exact"] and ar["num_images"] == 256
    assert ar["mean"] == pytest.approx(float(np.mean(per_image)), abs=1e-5)
    assert ar["mean"] - entropy < 0.1  # approaches the entropy ...
    assert ar["mean"] > entropy - 3 * ar["mean_stderr"]  # ... and never falls below it beyond its error

    # The absorbing prior on the same data, reported beside it: its ELBO bounds the NLL from above.
    fit_prior(load_config(None, TINY), markov, tmp_path / "absorbing", device="cpu")
    elbo = evaluate_elbo(tmp_path / "absorbing", markov, estimator="mc", draws=8, device="cpu")
    assert not elbo["exact"] and elbo["mean"] > entropy - 3 * elbo["mean_stderr"]
    print(f"\nentropy {entropy:.4f}; AR NLL {ar['mean']:.4f} ± {ar['mean_stderr']:.4f}; "
          f"absorbing ELBO {elbo['mean']:.4f} ± {elbo['mean_stderr']:.4f} bits/token")

    # `uvq sample`'s library call samples it token by token (codes only: no VQGAN in this test),
    # and refuses a step budget before it writes anything.
    from uvq.sampling.outputs import write_samples

    with pytest.raises(UserError, match="one token per step"):
        write_samples(tmp_path / "ar", tmp_path / "bad", steps=8, images=False, codes=True, n=4, device="cpu")
    assert not (tmp_path / "bad").exists()
    done = write_samples(tmp_path / "ar", tmp_path / "smp", images=False, codes=True, n=4, temp=1.0, device="cpu")
    assert done["sampler"].startswith("autoregressive") and done["network_passes_per_image"] == N

    # An AR prior is refused by upscale-canvas and inpaint with one line, exit 2, nothing written.
    res = uvq_cli("upscale-canvas", "--prior", str(tmp_path / "ar"), "--out", str(tmp_path / "canvas"))
    assert res.returncode == 2 and "section 4.5" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "canvas").exists()
