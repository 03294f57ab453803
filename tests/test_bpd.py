"""Full-model bits per dimension (`uvq eval bpd`) and the flip-grouped standard error.

The discretised Gaussian term is checked against scipy's normal CDF (closed form) and by a
brute-force sum over all 2^bits values; the command runs on a tiny VQGAN/prior pair with the demo
images; fine-tuning the head lowers the pixel NLL on images it never saw.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from uvq.evaluation.bpd import discretized_gaussian_nll, finetune_head, quantize_bits
from uvq.prior.likelihood import grouped_stderr
from uvq.prior.model import AbsorbingTransformer

# ---------------------------------------------------------------------------------------------
# The discretised Gaussian
# ---------------------------------------------------------------------------------------------


def _scipy_nll(x: np.ndarray, mean: np.ndarray, std: np.ndarray, bits: int) -> np.ndarray:
    half = 0.5 / (2 ** bits - 1)
    lower = np.where(x <= half, 0.0, norm.cdf(x - half, mean, std))
    upper = np.where(x >= 1 - half, 1.0, norm.cdf(x + half, mean, std))
    return -np.log(upper - lower)


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_discretized_gaussian_matches_the_closed_form(bits):
    g = torch.Generator().manual_seed(bits)
    mean = torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64) * 1.2 - 0.1
    log_std = torch.rand(mean.shape, generator=g, dtype=torch.float64) * 3 - 4  # std in [0.018, 0.37]
    noisy = mean + 2 * log_std.exp() * torch.randn(mean.shape, generator=g, dtype=torch.float64)
    x = ((noisy.clamp(0, 1) * (2 ** bits - 1)).round() / (2 ** bits - 1))  # pixels near their means, and edges
    ours = discretized_gaussian_nll(x, mean, log_std, bits).numpy()
    with np.errstate(divide="ignore"):
        ref = _scipy_nll(x.numpy(), mean.numpy(), log_std.exp().numpy(), bits)
    plain = ref < 20  # where the direct CDF difference keeps its digits (the far tails: the next tests)
    assert plain.mean() > 0.7
    np.testing.assert_allclose(ours[plain], ref[plain], rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_bins_sum_to_one_and_edge_bins_take_the_tails(bits):
    g = torch.Generator().manual_seed(10 + bits)
    mean = torch.rand(1, 3, 2, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2  # [1,3,2,2], tiny images
    log_std = torch.rand(mean.shape, generator=g, dtype=torch.float64) * 4 - 5
    levels = torch.arange(2 ** bits, dtype=torch.float64) / (2 ** bits - 1)  # every value a pixel can take
    x = levels.view(-1, 1, 1, 1).expand(-1, 3, 2, 2)  # [2^bits, 3, 2, 2]
    p = torch.exp(-discretized_gaussian_nll(x, mean.expand_as(x), log_std.expand_as(x), bits))
    torch.testing.assert_close(p.sum(0), torch.ones(3, 2, 2, dtype=torch.float64), rtol=0, atol=1e-12)
    half = 0.5 / (2 ** bits - 1)
    std = log_std.exp()[0].numpy()
    np.testing.assert_allclose(p[0].numpy(), norm.cdf(half, mean[0].numpy(), std), rtol=1e-9)
    np.testing.assert_allclose(p[-1].numpy(), norm.sf(1 - half, mean[0].numpy(), std), rtol=1e-9)


def test_far_tails_stay_finite_and_exact():
    # a pixel 40 standard deviations from the mean: the direct CDF difference is 0, the log is not
    x = torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64)
    mean = torch.tensor([0.1, 0.2, 0.9], dtype=torch.float64)
    log_std = torch.full((3,), math.log(0.01), dtype=torch.float64)
    nll = discretized_gaussian_nll(x, mean, log_std, 8)
    assert torch.isfinite(nll).all()
    half = 0.5 / 255
    ref0 = -(norm.logsf(0.5 - half, 0.1, 0.01) + np.log1p(-np.exp(norm.logsf(0.5 + half, 0.1, 0.01)
                                                                    - norm.logsf(0.5 - half, 0.1, 0.01))))
    assert float(nll[0]) == pytest.approx(ref0, rel=1e-9)
    assert float(nll[1]) == pytest.approx(-norm.logsf(1 - half, 0.2, 0.01), rel=1e-9)
    assert float(nll[2]) == pytest.approx(-norm.logcdf(half, 0.9, 0.01), rel=1e-9)


def test_quantize_bits_keeps_the_top_bits():
    v = torch.arange(256, dtype=torch.float64)
    assert torch.equal(quantize_bits(v / 255, 8), v / 255)
    assert torch.equal(quantize_bits(v / 255, 5) * 31, torch.div(v, 8, rounding_mode="floor"))


# ---------------------------------------------------------------------------------------------
# An image and its mirror copy are one group for the standard error
# ---------------------------------------------------------------------------------------------


def test_grouped_stderr_against_a_direct_computation():
    rng = np.random.default_rng(0)
    base = rng.normal(5, 1, 40)
    values = np.concatenate([base + rng.normal(0, 0.1, 40), base + rng.normal(0, 0.1, 40)])
    keys = [f"img{i}" for i in range(40)] + [f"img{i}.flip" for i in range(40)]
    se, groups = grouped_stderr(keys, torch.tensor(values))
    group_means = values.reshape(2, 40).mean(0)
    assert groups == 40
    assert se == pytest.approx(group_means.std(ddof=1) / math.sqrt(40), rel=1e-12)
    naive = values.std(ddof=1) / math.sqrt(80)
    assert se > 1.3 * naive  # correlated copies: counting them as independent understates the error
    # groups of one: the usual standard error
    se1, g1 = grouped_stderr(keys[:40], torch.tensor(values[:40]))
    assert g1 == 40 and se1 == pytest.approx(values[:40].std(ddof=1) / math.sqrt(40), rel=1e-12)
    # unequal groups (a split cut between an image and its copy): the sandwich formula, by loops
    cut_keys, cut = keys[:50], values[:50]
    se2, g2 = grouped_stderr(cut_keys, torch.tensor(cut))
    resid = cut - cut.mean()
    sums: dict[str, float] = {}
    for k, r in zip(cut_keys, resid, strict=True):
        sums[k.removesuffix(".flip")] = sums.get(k.removesuffix(".flip"), 0.0) + r
    direct = math.sqrt(len(sums) / (len(sums) - 1) * sum(s * s for s in sums.values()) / len(cut) ** 2)
    assert g2 == 40 and se2 == pytest.approx(direct, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Fine-tuning and the command on tiny models
# ---------------------------------------------------------------------------------------------


def _make_pair(root):
    """A tiny VQGAN (16x16 pixels, 8x8 latents) and a prior whose provenance names it."""
    from uvq.checkpoint import read_meta, save_checkpoint
    from uvq.config import PriorConfig, VQGANConfig
    from uvq.prior.latents import tokenizer_record
    from uvq.vqgan.model import build_vqgan

    torch.manual_seed(0)
    vc = VQGANConfig(img_size=16, nf=32, ch_mult=[1, 2], res_blocks=1, attn_resolutions=[], emb_dim=8,
                     codebook_size=16)
    vq_ckpt = save_checkpoint(root / "vqgan", 10, kind="vqgan", model_config=dataclasses.asdict(vc),
                              weights={"model": build_vqgan(vc)})
    pc = PriorConfig(n_embd=32, n_head=2, n_layer=1, codebook_size=16, latent_shape=list(vc.latent_shape))
    net = AbsorbingTransformer(codebook_size=16, n_tokens=pc.n_tokens, n_embd=32, n_head=2, n_layer=1)
    meta = read_meta(vq_ckpt)
    tok = tokenizer_record(meta | {"weights_sha256": meta["weights_sha256"]["model"]}, "model")
    prior_ckpt = save_checkpoint(root / "prior", 20, kind="prior", model_config=dataclasses.asdict(pc),
                                 weights={"model": net}, provenance={"tokenizer": tok})
    return vq_ckpt, prior_ckpt


def _demo_images(n, offset, size=16):
    from uvq.data.demo import demo_image

    return torch.stack([demo_image(i, size) for i in range(offset, offset + n)])  # [n, 3, size, size]


def test_finetuning_lowers_the_pixel_nll_on_held_out_images():
    from uvq.config import VQGANConfig
    from uvq.vqgan.model import build_vqgan

    torch.manual_seed(0)
    vq = build_vqgan(VQGANConfig(img_size=16, nf=32, ch_mult=[1, 2], res_blocks=1, attn_resolutions=[], emb_dim=8,
                                 codebook_size=16))
    head = vq.decoder.add_likelihood_head()
    train, held_out = _demo_images(16, 0), quantize_bits(_demo_images(8, 100), 5)

    def held_out_nll():
        with torch.no_grad():
            mean, log_std = vq.decode_gaussian(vq.encode_codes(held_out))
            return float(discretized_gaussian_nll(held_out, mean, log_std, 5).mean())

    before = held_out_nll()  # log-std 0: a unit Gaussian over [0, 1]
    frozen = {k: v.clone() for k, v in vq.state_dict().items() if not k.startswith("decoder.logsigma")}
    batches = iter([train[i % 2 * 8:(i % 2 + 1) * 8] for i in range(60)])
    losses = finetune_head(vq, batches, bits=5, steps=60, lr=3e-3, fresh=True)
    after = held_out_nll()
    assert losses[-1] < losses[0] - 0.2 and after < before - 0.1  # nats per dimension, on unseen images
    assert all(torch.equal(v, vq.state_dict()[k]) for k, v in frozen.items())  # everything else frozen
    assert head is vq.decoder.logsigma


def test_eval_bpd_cli_runs_reuses_its_head_and_refuses_before_writing(tmp_path, uvq_cli):
    vq, prior = _make_pair(tmp_path)
    out = tmp_path / "bpd"
    args = ["eval", "bpd", "--prior", str(prior), "--data", "demo", "--out", str(out), "--max-images", "40",
            "--bits", "5", "--device", "cpu", "--json", "bpd.finetune_steps=5", "bpd.batch_size=8",
            "bpd.flip_copies=true", "bpd.estimator=mc", "bpd.draws=2"]
    res = uvq_cli(*args)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    rows = list(csv.DictReader((out / "bpd.csv").open()))
    assert len(rows) == report["num_images"] == 2 * report["num_groups"] > 0
    assert sum(r["key"].endswith(".flip") for r in rows) == report["num_groups"]
    bpd = np.array([float(r["bits_per_dim"]) for r in rows])
    prior_bits = np.array([float(r["prior_bits_per_token"]) for r in rows])
    pixel = np.array([float(r["pixel_bits_per_dim"]) for r in rows])
    # bpd = (N * prior bits/token + pixel bits) / D with N = 64 tokens, D = 3 * 16 * 16
    np.testing.assert_allclose(bpd, (64 * prior_bits + pixel * 768) / 768, atol=2e-5)
    assert report["mean"] == pytest.approx(bpd.mean(), abs=1e-5) and report["bits"] == 5
    assert report["mean_pixel_bits_per_dim"] > 0 and report["mean_prior_bits_per_token"] > 0
    assert not report["head"]["reused"] and (out / "likelihood_head.safetensors").is_file()
    # A rerun with the same inputs reuses the head and gives the same numbers; other inputs refit it.
    again = json.loads(uvq_cli(*args).stdout)
    assert again["head"]["reused"] and again["mean"] == report["mean"]
    refit = uvq_cli(*args[:-4], "bpd.finetune_steps=6", *args[-3:])
    assert refit.returncode == 0, refit.stderr
    assert not json.loads(refit.stdout)["head"]["reused"]
    # Refused before the first write: an unknown key, a bad bit depth, a missing data folder.
    for bad, message in ((["bpd.nope=1"], "nope"), (["--bits", "9"], "bpd.bits"),
                         (["--data", str(tmp_path / "missing")], "does not exist")):
        fresh = tmp_path / f"refused{len(message)}"
        res = uvq_cli("eval", "bpd", "--prior", str(prior), "--data", "demo", "--out", str(fresh), "--device", "cpu",
                      *bad)
        assert res.returncode == 2 and message in res.stderr and not fresh.exists(), res.stderr
    # A damaged head file is one clear line, not a traceback.
    (out / "likelihood_head.safetensors").write_bytes(b"not a safetensors file")
    res = uvq_cli(*args)
    assert res.returncode == 2 and "likelihood head" in res.stderr and "Traceback" not in res.stderr
