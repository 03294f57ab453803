"""fit-prior: the validation ELBO falls on structured tokens, exact resume, VQGAN consistency, eval elbo."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import tarfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from uvq.checkpoint import write_checkpoint_dir
from uvq.config import load_config
from uvq.prior.latents import write_latents
from uvq.prior.likelihood import evaluate_elbo
from uvq.prior.train import check_fit_prior, fit_prior
from uvq.runtime import UserError

K, N_PATTERNS = 16, 8

TINY = ["model.prior.n_embd=32", "model.prior.n_head=2", "model.prior.n_layer=2", f"model.prior.codebook_size={K}",
        "model.prior.latent_shape=[4,4]", f"model.vqgan.codebook_size={K}", "model.vqgan.img_size=64",
        "prior_train.batch_size=32", "prior_train.lr=0.003", "prior_train.warmup_steps=20",
        "prior_train.val_batches=2", "prior_train.val_draws=8", "prior_train.ema_beta=0.9", "prior_train.ema_every=1",
        "run.log_every=20", "run.image_every=100", "run.ckpt_every=100"]


@pytest.fixture(scope="module")
def patterns(tmp_path_factory):
    """Token grids drawn uniformly from 8 distinct 4x4 patterns: entropy log2(8)/16 bits per token."""
    rng = np.random.default_rng(0)
    pats = rng.integers(0, K, (N_PATTERNS, 4, 4))
    assert len({p.tobytes() for p in pats}) == N_PATTERNS

    def draw(n, prefix):
        return [(f"{prefix}{i:05d}", pats[j]) for i, j in enumerate(rng.integers(0, N_PATTERNS, n))]

    root = tmp_path_factory.mktemp("tokens")
    write_latents(root, {"train": draw(512, "t"), "val": draw(64, "v")}, codebook_size=K, shard_size=128)
    return root


def test_validation_elbo_falls_but_not_below_the_entropy(tmp_path, patterns):
    cfg = load_config(None, [*TINY, "prior_train.steps=240", "prior_train.val_every=80"])
    first = evaluate_untrained(cfg, patterns)
    summary = fit_prior(cfg, patterns, tmp_path / "run", device="cpu")
    vals = [r["val_elbo_bits_per_token"] for r in _metrics(tmp_path / "run") if "val_elbo_bits_per_token" in r]
    stderr = [r["val_stderr"] for r in _metrics(tmp_path / "run") if "val_stderr" in r]
    entropy = math.log2(N_PATTERNS) / 16
    assert abs(first - math.log2(K)) < 0.5  # an untrained prior is close to uniform
    assert len(vals) == 3 and vals[-1] < vals[0] and vals[-1] < 0.25 * math.log2(K)
    assert all(v + 4 * e > entropy for v, e in zip(vals, stderr, strict=True))  # an upper bound on the NLL
    # The training loss and the ELBO of the same batch are both logged; the plot and best link exist.
    assert all("loss" in r and "elbo_bits_per_token" in r for r in _metrics(tmp_path / "run") if "lr" in r)
    assert summary["best"]["val_bits_per_token"] == min(vals)
    best = (tmp_path / "run" / "checkpoints" / "best").resolve()
    assert best.name == f"step-{summary['best']['step']:08d}"
    assert (tmp_path / "run" / "images" / "loss-by-t-00000240.png").is_file()
    meta = json.loads((best / "meta.json").read_text())
    assert meta["kind"] == "prior" and meta["provenance"]["tokenizer"] is None
    assert meta["provenance"]["latents"]["latent_shape"] == [4, 4]


def evaluate_untrained(cfg, latents):
    from uvq.prior.train import _build
    from uvq.registry import registry

    torch.manual_seed(0)
    model, process = _build(cfg, torch.device("cpu"))
    assert registry.get("priors", cfg.model.prior.name)
    from uvq.prior.latents import read_manifest
    from uvq.prior.likelihood import elbo_per_image

    return elbo_per_image(model.eval(), process, read_manifest(latents), estimator="mc", draws=4)["mean"]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_exact(tmp_path, patterns):
    overrides = [*TINY, "prior_train.steps=60", "prior_train.val_every=30", "run.ckpt_every=30", "run.log_every=10",
                 "prior_train.time_sampling=importance"]
    cfg = load_config(None, overrides)
    fit_prior(cfg, patterns, tmp_path / "straight", device="cpu")
    fit_prior(cfg, patterns, tmp_path / "split", device="cpu", max_steps=30)
    fit_prior(load_config(None, overrides), patterns, tmp_path / "split", device="cpu", resume=True)
    for which in ("model", "ema"):
        a = load_file(str(tmp_path / "straight" / "checkpoints" / "last" / f"{which}.safetensors"))
        b = load_file(str(tmp_path / "split" / "checkpoints" / "last" / f"{which}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in ma] == \
           [{k: v for k, v in r.items() if k not in drop} for r in mb]


def _vqgan_ckpt(path, codebook_size=K, img_size=64, seed=0):
    from uvq.vqgan.model import build_vqgan

    cfg = load_config(None, [f"model.vqgan.codebook_size={codebook_size}", f"model.vqgan.img_size={img_size}",
                             "model.vqgan.nf=32", "model.vqgan.ch_mult=[1,1,1,1,1]", "model.vqgan.emb_dim=8",
                             "model.vqgan.attn_resolutions=[]", f"model.prior.codebook_size={codebook_size}",
                             f"model.prior.latent_shape=[{img_size // 16},{img_size // 16}]"])
    torch.manual_seed(seed)
    write_checkpoint_dir(path, kind="vqgan", model_config=dataclasses.asdict(cfg.model.vqgan),
                         weights={"ema": build_vqgan(cfg.model.vqgan)}, config=cfg.to_dict())
    return json.loads((path / "meta.json").read_text())["weights_sha256"]["ema"]


def test_mismatched_latents_are_refused(tmp_path, patterns):
    sha = _vqgan_ckpt(tmp_path / "vq_a")
    _vqgan_ckpt(tmp_path / "vq_b", seed=1)
    _vqgan_ckpt(tmp_path / "vq_big", codebook_size=32)
    rng = np.random.default_rng(0)
    grids = {"train": [(f"t{i}", rng.integers(0, K, (4, 4))) for i in range(40)],
             "val": [(f"v{i}", rng.integers(0, K, (4, 4))) for i in range(8)]}
    write_latents(tmp_path / "lat", grids, codebook_size=K,
                  tokenizer={"sha256": sha, "path": str(tmp_path / "vq_a"), "weights": "ema"})
    cfg = load_config(None, [*TINY, "prior_train.steps=2", "prior_train.val_every=2"])
    with pytest.raises(UserError, match="tokenizer sha256 differs"):
        fit_prior(cfg, tmp_path / "lat", tmp_path / "r1", device="cpu", vqgan=tmp_path / "vq_b")
    with pytest.raises(UserError, match="codebook_size differs"):
        fit_prior(cfg, tmp_path / "lat", tmp_path / "r2", device="cpu", vqgan=tmp_path / "vq_big")
    other = load_config(None, [*TINY, "model.prior.latent_shape=[2,2]", "model.vqgan.img_size=32"])
    with pytest.raises(UserError, match="latent_shape differs"):
        fit_prior(other, tmp_path / "lat", tmp_path / "r3", device="cpu")
    cfg_vq = load_config(None, [*TINY, "prior_train.steps=2", "prior_train.val_every=2",
                                f"prior_train.vqgan={tmp_path / 'vq_a'}"])
    summary = fit_prior(cfg_vq, tmp_path / "lat", tmp_path / "ok", device="cpu")  # the right VQGAN: accepted
    meta = json.loads((tmp_path / "ok" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["provenance"]["tokenizer"]["sha256"] == sha and summary["vqgan"] == str(tmp_path / "vq_a")


def test_eval_elbo_cli_writes_csv_and_json(tmp_path, patterns, uvq_cli):
    cfg = load_config(None, [*TINY, "prior_train.steps=20", "prior_train.val_every=20"])
    fit_prior(cfg, patterns, tmp_path / "run", device="cpu")
    out = tmp_path / "eval"
    res = uvq_cli("eval", "elbo", "--prior", str(tmp_path / "run"), "--latents", str(patterns), "--split", "val",
                  "--estimator", "mc", "--draws", "4", "--out", str(out), "--json", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    rows = list(csv.DictReader((out / "elbo.csv").open()))
    assert len(rows) == 64 == report["num_images"] and rows[0]["key"] == "v00000"
    values = np.array([float(r["bits_per_token"]) for r in rows])
    assert report["mean"] == pytest.approx(values.mean(), abs=1e-5)
    assert report["mean_stderr"] == pytest.approx(values.std(ddof=1) / 8, rel=1e-3)
    assert json.loads((out / "elbo.json").read_text())["prior"].endswith("step-00000020")
    # The library call with the full-sum estimator agrees within the errors (both estimate one bound).
    full = evaluate_elbo(tmp_path / "run", patterns, estimator="full", device="cpu")
    assert abs(full["mean"] - report["mean"]) < 4 * math.hypot(full["mean_stderr"], report["mean_stderr"])


# ---------------------------------------------------------------------------------------------
# Exact resume of the logged losses; metrics.jsonl never holds a step twice (issue 11, finding 7)
# ---------------------------------------------------------------------------------------------

# Checkpoints every 6 steps and logs every 4: the resume at step 10 lands inside a logging window.
RESUME = [*TINY, "prior_train.steps=16", "prior_train.val_every=8", "run.ckpt_every=6", "run.log_every=4"]


def _losses(run):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in _metrics(run)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, patterns):
    out = tmp_path_factory.mktemp("straight") / "run"
    fit_prior(load_config(None, RESUME), patterns, out, device="cpu")
    return out


def test_resume_mid_window_logs_the_same_losses(tmp_path, patterns, straight):
    cfg = load_config(None, RESUME)
    fit_prior(cfg, patterns, tmp_path / "split", device="cpu", max_steps=10)  # stops at step 10 (a checkpoint)
    assert [r["step"] for r in _metrics(tmp_path / "split")][-1] == 8
    fit_prior(cfg, patterns, tmp_path / "split", device="cpu", resume=True)
    assert _losses(tmp_path / "split") == _losses(straight)  # bit-identical, the window of steps 9-12 included
    for which in ("model", "ema"):
        a = load_file(str(straight / "checkpoints" / "last" / f"{which}.safetensors"))
        b = load_file(str(tmp_path / "split" / "checkpoints" / "last" / f"{which}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "split" / "checkpoints" / "last" / "trainer.pt", weights_only=True)
    assert state["format"] == 2 and "weights" not in state["ema"]  # the EMA's weights are stored once


def test_resume_before_the_first_checkpoint_logs_no_step_twice(tmp_path, patterns, straight):
    cfg = load_config(None, RESUME)
    fit_prior(cfg, patterns, tmp_path / "run", device="cpu", max_steps=5)
    # As if killed before its first checkpoint: the rows of steps 4 (and its log) exist, no checkpoint does.
    for p in (tmp_path / "run" / "checkpoints").iterdir():
        p.unlink() if p.is_symlink() else shutil.rmtree(p)
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [4]
    fit_prior(cfg, patterns, tmp_path / "run", device="cpu", resume=True)
    steps = [(r["step"], "val_stderr" in r) for r in _metrics(tmp_path / "run")]
    assert len(steps) == len(set(steps))
    assert _losses(tmp_path / "run") == _losses(straight)


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, patterns, straight):
    cfg = load_config(None, RESUME)
    fit_prior(cfg, patterns, tmp_path / "run", device="cpu", max_steps=12)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 13, "loss": 2.71')  # a write killed half-way
    events = []
    fit_prior(cfg, patterns, tmp_path / "run", device="cpu", resume=True, progress=events.append)
    assert any(e["event"] == "warn" and "torn" in e["message"] for e in events)
    assert _losses(tmp_path / "run") == _losses(straight)


def test_a_damaged_line_before_the_last_is_refused(tmp_path, patterns):
    cfg = load_config(None, RESUME)
    fit_prior(cfg, patterns, tmp_path / "run", device="cpu", max_steps=8)
    f = tmp_path / "run" / "metrics.jsonl"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(["{not json", *lines]) + "\n")
    with pytest.raises(UserError, match="line 1 is not JSON"):
        fit_prior(cfg, patterns, tmp_path / "run", device="cpu", resume=True)


# ---------------------------------------------------------------------------------------------
# Empty splits are refused at start (issue 11, finding 9)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_empty_shards_are_refused_before_anything_is_written(tmp_path, split):
    rng = np.random.default_rng(0)
    grids = {"train": [(f"t{i}", rng.integers(0, K, (4, 4))) for i in range(40)],
             "val": [(f"v{i}", rng.integers(0, K, (4, 4))) for i in range(8)]}
    write_latents(tmp_path / "lat", grids, codebook_size=K, shard_size=16)
    manifest = json.loads((tmp_path / "lat" / "manifest.json").read_text())
    emptied = [s["name"] for s in manifest["shards"] if s["split"] == split]
    for name in emptied:  # the manifest still counts their samples
        with tarfile.open(tmp_path / "lat" / name, "w"):
            pass
    cfg = load_config(None, [*TINY, "prior_train.steps=4", "prior_train.val_every=2"])
    with pytest.raises(UserError, match=f"{split} shards hold none"):
        fit_prior(cfg, tmp_path / "lat", tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match=f"{split} shards hold none"):
        check_fit_prior(cfg, tmp_path / "lat", tmp_path / "run", device="cpu")  # the dry run says the same
