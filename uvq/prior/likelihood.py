"""Likelihoods of the priors per image in bits per token: the absorbing prior's ELBO (Eq. 6) of a
split, and the autoregressive prior's exact NLL (paper section 4.2, Table 4).

Used by the validation of `fit-prior` and by `uvq eval elbo` (`evaluate_elbo`); see docs/method.md section 6.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from uvq.checkpoint import (
    resolve_checkpoint,
)
from uvq.prior.latents import FLIP_SUFFIX, check_tokenizer, iterate_latents, read_manifest
from uvq.progress import ProgressFn, null_progress
from uvq.runtime import (
    UserError,
    amp_context,
    init_distributed,
    resolve_device,
)

VAL_SEED = 1234567  # the validation generator's seed: the same masks at every evaluation


# ---------------------------------------------------------------------------------------------
# The ELBO of a split (Eq. 6), per image in bits per token: validation and `uvq eval elbo`
# ---------------------------------------------------------------------------------------------


def grouped_stderr(keys: list[str], values: torch.Tensor) -> tuple[float, int]:
    """Standard error of the mean of `values` [n] with an image and its mirror copy as one group.

    With `encode.flip_copies` a split holds "<key>" and "<key>.flip", two strongly correlated
    values; counting them as independent understates the error. This is the cluster-robust
    (sandwich) variance of a mean (Cameron and Miller 2015, "A Practitioner's Guide to
    Cluster-Robust Inference", eq. 11 with the G/(G-1) factor):
        SE^2 = G/(G-1) * sum_g (sum_{i in g} (y_i - mean))^2 / n^2    over the G groups,
    which for groups of equal size is the spread of the group means over sqrt(G), and for groups
    of one the usual std/sqrt(n). Returns (SE, G); SE is NaN with fewer than two groups.
    """
    groups: dict[str, int] = {}
    index = torch.tensor([groups.setdefault(k.removesuffix(FLIP_SUFFIX), len(groups)) for k in keys],
                         dtype=torch.int64)
    g, n = len(groups), len(keys)
    if g < 2:
        return float("nan"), g
    resid = values.double() - values.double().mean()  # [n]
    sums = torch.zeros(g, dtype=torch.float64).index_add_(0, index, resid)  # [G]
    return math.sqrt(g / (g - 1) * float((sums ** 2).sum()) / n ** 2), g


@torch.no_grad()
def elbo_per_image(model: torch.nn.Module, process, manifest: dict[str, Any], *, split: str = "val",
                   estimator: str = "mc", draws: int = 16, batch_size: int = 64, max_samples: int | None = None,
                   seed: int = VAL_SEED, device: torch.device | str = "cpu", precision: str = "fp32",
                   rank: int = 0, world_size: int = 1, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Negative ELBO of every image of a split, in bits per token, with its estimator's standard error.

    estimator "full": the sum over all t = 1..T with one masking draw per t (the authors' code);
    "mc": `draws` single-t draws t ~ U{1..T}, each T/t * CE_masked(t) (Eq. 6's one-sample
    estimate), averaged. Both are unbiased for the same bound. The generator is seeded with
    `seed`, so repeated evaluations see the same masks and are comparable.
    "exact": the autoregressive prior's negative log-likelihood (`process` an
    `uvq.prior.autoregressive.AutoregressiveProcess`), no bound and no draws: per-image errors are 0.
    Returns keys, per-image values and standard errors (NaN for "full"), their mean over images
    and the standard error of that mean (the spread over images, an image and its mirror copy
    counted as one group: `grouped_stderr`).
    """
    progress = progress or null_progress
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed + rank)
    keys: list[str] = []
    values: list[torch.Tensor] = []
    errors: list[torch.Tensor] = []
    task = f"elbo {split}"
    progress({"event": "start", "task": task, "total": max_samples, "unit": "img"})
    for batch in iterate_latents(manifest, split, batch_size=batch_size, rank=rank, world_size=world_size,
                                 max_samples=max_samples):
        x0 = batch["codes"].flatten(1).to(device)  # [B, N]
        with amp_context(device, precision):
            if estimator == "exact":
                if not getattr(process, "exact", False):
                    raise UserError("the exact estimator needs an autoregressive prior; an absorbing one has an ELBO")
                v = process.nll(model, x0)  # [B] bits/token
                e = torch.zeros_like(v)
            elif estimator == "full":
                v = process.elbo_full_sum(model, x0, generator=generator)  # [B] bits/token
                e = torch.full_like(v, float("nan"))
            elif estimator == "mc":
                v, e = process.elbo_monte_carlo(model, x0, n_draws=draws, generator=generator)  # [B], [B]
            else:
                raise UserError(f"estimator must be full, mc or exact, not {estimator!r}")
        keys += batch["key"]
        values.append(v.float().cpu())
        errors.append(e.float().cpu())
        progress({"event": "advance", "task": task, "n": len(batch["key"]),
                  "metrics": {"bits_per_token": float(torch.cat(values).mean())}})
    values_t = torch.cat(values) if values else torch.zeros(0)
    errors_t = torch.cat(errors) if errors else torch.zeros(0)
    if world_size > 1:  # gather every rank's images (evaluation sets are small)
        import torch.distributed as dist

        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, (keys, values_t, errors_t))
        keys = [k for g in gathered for k in g[0]]
        values_t = torch.cat([g[1] for g in gathered])
        errors_t = torch.cat([g[2] for g in gathered])
    n = len(values_t)
    mean = float(values_t.mean()) if n else float("nan")
    stderr, groups = grouped_stderr(keys, values_t)
    progress({"event": "end", "task": task, "metrics": {"bits_per_token": mean, "stderr": stderr}})
    return {"keys": keys, "bits_per_token": values_t, "stderr": errors_t, "mean": mean, "mean_stderr": stderr,
            "num_images": n, "num_groups": groups, "estimator": estimator, "draws": draws if estimator == "mc" else None}


# ---------------------------------------------------------------------------------------------
# `uvq eval elbo`
# ---------------------------------------------------------------------------------------------


def evaluate_elbo(prior: str | Path, latents_dir: str | Path, *, split: str = "val", estimator: str = "full",
                  draws: int = 16, batch_size: int = 64, seed: int = 0, max_samples: int | None = None,
                  weights: str = "default", device: str = "auto", progress: ProgressFn | None = None) -> dict[str, Any]:
    """Per-image negative ELBO (bits/token) of a split under a prior checkpoint, with provenance."""
    from uvq.checkpoint import load_model

    dev = resolve_device(device)
    dist = init_distributed(dev)
    ckpt = resolve_checkpoint(prior)
    model, meta = load_model(ckpt, "prior", weights=weights, device=dev)
    manifest = read_manifest(latents_dir)
    pc = meta["model_config"]
    check_tokenizer(manifest, codebook_size=pc["codebook_size"], latent_shape=pc["latent_shape"],
                    against=f"prior {ckpt}")
    trained_on = (meta.get("provenance") or {}).get("tokenizer")
    if trained_on and manifest.get("tokenizer") and trained_on.get("sha256") != manifest["tokenizer"].get("sha256"):
        raise UserError(f"tokenizer sha256 differs: prior {ckpt} was trained on codes of VQGAN "
                        f"{trained_on.get('sha256', '')[:12]}, but latents {latents_dir} come from "
                        f"{manifest['tokenizer'].get('sha256', '')[:12]}; its likelihood of other codes means nothing")
    process, info = prior_process(meta)
    if info["exact"]:  # the AR prior's likelihood is exact: no bound, no masking draws (estimator and draws do not apply)
        estimator = "exact"
    result = elbo_per_image(model, process, manifest, split=split, estimator=estimator, draws=draws,
                            batch_size=batch_size, max_samples=max_samples, seed=seed, device=dev,
                            precision="fp32", rank=dist.rank, world_size=dist.world_size, progress=progress)
    result.update({"prior": str(ckpt), "weights": meta.get("default_weights") if weights == "default" else weights,
                   "prior_step": meta.get("step"), "latents": str(latents_dir), "split": split, "seed": seed,
                   **info, "tokenizer": manifest.get("tokenizer") and
                   manifest["tokenizer"].get("sha256"), "rank": dist.rank})
    return result


def prior_process(meta: dict[str, Any]):
    """The process a prior checkpoint was trained with, for its likelihood: (process, info).

    Absorbing (T and masking from the checkpoint's recipe): an ELBO. Autoregressive: the exact
    NLL (`process.exact`). info: {"process", "exact", "T", "masking", "log2_codebook"}.
    """
    from uvq.config import PriorConfig, PriorTrainConfig, section_from_dict
    from uvq.prior.absorbing import AbsorbingDiffusion
    from uvq.prior.autoregressive import NAME as AUTOREGRESSIVE
    from uvq.prior.autoregressive import AutoregressiveProcess, process_name

    pcfg = section_from_dict(PriorConfig, meta["model_config"], "model.prior")
    tcfg = section_from_dict(PriorTrainConfig, (meta.get("config") or {}).get("prior_train") or {}, "prior_train")
    log2_k = math.log2(pcfg.codebook_size)
    if process_name(meta) == AUTOREGRESSIVE or pcfg.causal:
        process = AutoregressiveProcess(n_tokens=pcfg.n_tokens, codebook_size=pcfg.codebook_size)
        return process, {"process": AUTOREGRESSIVE, "exact": True, "T": None, "masking": None,
                         "log2_codebook": log2_k}
    process = AbsorbingDiffusion(n_tokens=pcfg.n_tokens, codebook_size=pcfg.codebook_size,
                                 T=tcfg.diffusion_steps(pcfg), masking=tcfg.masking,
                                 time_sampling="uniform")
    return process, {"process": "absorbing.v1", "exact": False, "T": process.T, "masking": tcfg.masking,
                     "log2_codebook": log2_k}
