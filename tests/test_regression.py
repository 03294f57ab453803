"""Stored losses of the tiny recipe (recipes/tiny.yaml) for seed 0: a bit-identity guard.

Every stage runs in-process on the CPU (fit-vqgan, encode, fit-prior, a few sampling steps, the
validation ELBO) and its logged losses, weights, sampled tokens and ELBOs are compared with the
values stored in tests/regression/tiny.json, EXACTLY (float equality, no tolerance): a refactor
of the training loops must not change a single bit of what they compute (torchtune's recipe
tests compare losses with stored values in the same way).

The stored values were made by this test on the CPU (torch's CPU kernels are deterministic for
these ops). To remake them after a change that is meant to alter results, run
`UVQ_REGENERATE=1 pytest tests/test_regression.py` and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from uvq.checkpoint import load_model
from uvq.config import load_config
from uvq.prior.latents import encode_dataset
from uvq.prior.likelihood import evaluate_elbo
from uvq.prior.train import fit_prior
from uvq.sampling.chain import sample_tokens
from uvq.vqgan.train import fit_vqgan

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
STORED = Path(__file__).resolve().parent / "regression" / "tiny.json"
# Logged values that measure wall time, not the computation.
TIMING = ("images_per_s", "tokens_per_s")


def _losses(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _tensor_digest(path: Path) -> str:
    """sha256 of a safetensors file's tensors (names, dtypes, shapes, bytes), not of its metadata."""
    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _weights(run: Path) -> dict[str, str]:
    last = run / "checkpoints" / "last"
    return {f.stem: _tensor_digest(f) for f in sorted(last.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """Every stage of the tiny recipe, in order, as the pipeline runs them."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = load_config(RECIPE)
    fit_vqgan(cfg, root / "vqgan", device="cpu")
    vqgan, meta = load_model(root / "vqgan", "vqgan", device="cpu")
    ec = cfg.encode
    encode_dataset(vqgan, meta, cfg.data, root / "latents", batch_size=ec.batch_size, shard_size=ec.shard_size,
                   flip_copies=ec.flip_copies, weights=ec.weights, device="cpu")
    fit_prior(cfg, root / "latents", root / "prior", device="cpu", vqgan=root / "vqgan")
    prior, _ = load_model(root / "prior", "prior", device="cpu")
    sc = cfg.sample
    tokens = sample_tokens(prior, sc.n, steps=sc.steps, temp=sc.temp, seed=cfg.run.seed, batch_size=sc.batch_size,
                           device="cpu", precision="fp32")
    elbo = evaluate_elbo(root / "prior", root / "latents", estimator="mc", draws=4, device="cpu")
    return {
        "vqgan_metrics": _losses(root / "vqgan"), "vqgan_weights": _weights(root / "vqgan"),
        "prior_metrics": _losses(root / "prior"), "prior_weights": _weights(root / "prior"),
        "sample_tokens": tokens.tolist(),
        "elbo": {"mean": elbo["mean"], "mean_stderr": elbo["mean_stderr"],
                 "bits_per_token": elbo["bits_per_token"].tolist()},
    }


@pytest.fixture(scope="module")
def stored(tiny_run) -> dict:
    if os.environ.get("UVQ_REGENERATE") == "1":
        STORED.write_text(json.dumps(tiny_run, indent=1) + "\n")
    assert STORED.is_file(), f"{STORED} is missing; make it with UVQ_REGENERATE=1"
    return json.loads(STORED.read_text())


@pytest.mark.parametrize("part", ["vqgan_metrics", "vqgan_weights", "prior_metrics", "prior_weights",
                                  "sample_tokens", "elbo"])
def test_tiny_recipe_matches_stored_values(tiny_run, stored, part):
    assert tiny_run[part] == stored[part]  # exact: floats round-trip through JSON bit for bit


def test_the_stored_run_trained(stored):
    """The guard guards a real run: both loops logged every log step, D trained, validation ran."""
    vq, pr = stored["vqgan_metrics"], stored["prior_metrics"]
    assert [r["step"] for r in vq] == [2, 4, 6, 8] and "d_loss" in vq[-1]
    assert [r["step"] for r in pr if "loss" in r] == [2, 4, 6, 8]
    assert [r["step"] for r in pr if "val_elbo_bits_per_token" in r] == [4, 8]
    assert len(stored["sample_tokens"]) == 4 and stored["elbo"]["mean"] > 0
