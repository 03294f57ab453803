"""Full-model bits per dimension (paper section 4.1.1; docs/method.md section 6, docs/evaluation.md).

The model of an image x is the prior's distribution of its codes z = E(x) and the decoder's
Gaussian likelihood of the pixels given the codes, discretised to the data's bit depth. Since
p(x) >= p(z) p(x | z) for the deterministic encoder,

    -log2 p(x) <= [ N * nelbo(z) + NLL(x | z) / ln 2 ] / D      bits per dimension, D = 3HW,

with nelbo(z) the prior's negative ELBO in bits per token (Eq. 6, uvq.prior.likelihood) and
NLL(x | z) the discretised Gaussian negative log-likelihood in nats. The paper reports 2.72 BPD on
5-bit FFHQ after fine-tuning the decoder's `logsigma` head with everything else frozen, as the
authors' code does; `finetune_head` is that procedure, `evaluate_bpd` the whole of `uvq eval bpd`.

Layers, top to bottom:
    quantize_bits / discretized_gaussian_nll    the pixel likelihood (closed form)
    finetune_head                               Adam on the head alone
    bpd_of_batch                                one batch's bits per dimension
    evaluate_bpd                                the command's library call (head file, fingerprint)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from uvq.progress import ProgressFn, null_progress
from uvq.runtime import UserError

HEAD_FILE = "likelihood_head.safetensors"

# ---------------------------------------------------------------------------------------------
# The discretised Gaussian likelihood of pixels (Ho et al. 2020, section 3.3; Kingma et al. 2016)
# ---------------------------------------------------------------------------------------------


def quantize_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Images [..] in [0,1] (8-bit data) -> the same images at `bits` bits, values k / (2^bits - 1).

    The 8-bit value v becomes floor(v / 2^(8-bits)), the reduction behind 5-bit FFHQ (Kingma and
    Dhariwal 2018, Glow's `n_bits_x`).
    """
    v = (x.clamp(0, 1) * 255).round()
    levels = torch.div(v, 2 ** (8 - bits), rounding_mode="floor")
    return levels / (2 ** bits - 1)


def _log_ndtr_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, accurate in both tails (reflected to the lower tail)."""
    flip = (a + b) > 0
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    d = log_a - log_b  # <= 0
    # log(1 - e^d), stable on both sides of d = -ln 2 (Maechler 2012, "Accurately computing log(1 - exp(-|a|))")
    log1mexp = torch.where(d > -math.log(2.0), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))
    return log_b + log1mexp


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, bits: int) -> torch.Tensor:
    """-log P(x) in nats per element of x [..] on the grid k / (2^bits - 1), under N(mean, exp(log_std)^2).

    Value k owns the bin [x - h, x + h], h = 1 / (2 (2^bits - 1)); the first bin reaches down to
    -inf and the last up to +inf, so the 2^bits probabilities sum to one. Computed in float64.
    """
    x, mean = x.double(), mean.double()
    inv_std = torch.exp(-log_std.double())
    half = 0.5 / (2 ** bits - 1)
    lower = torch.where(x <= half, torch.full_like(x, -math.inf), (x - half - mean) * inv_std)
    upper = torch.where(x >= 1 - half, torch.full_like(x, math.inf), (x + half - mean) * inv_std)
    return -_log_ndtr_diff(lower, upper)


# ---------------------------------------------------------------------------------------------
# Fine-tuning the likelihood head, everything else frozen (the authors' procedure)
# ---------------------------------------------------------------------------------------------


def _mean_and_features(vqgan: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [B,h,w], decoder features [B,C,H,W], mean image [B,3,H,W] in [0,1]) of frozen parts."""
    with torch.no_grad():
        codes = vqgan.encode_codes(x)
        z = vqgan.quantize.lookup(codes)
        if vqgan.post_quant_conv is not None:
            z = vqgan.post_quant_conv(z)
        h = vqgan.decoder.features(z)
        mean = vqgan.decoder.blocks[-1](h)
        if vqgan.signed_io:
            mean = (mean + 1.0) * 0.5
    return codes, h, mean


def _log_std(vqgan: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    log_std = vqgan.decoder.logsigma(h)
    return log_std - math.log(2.0) if vqgan.signed_io else log_std


def finetune_head(vqgan: torch.nn.Module, batches: Iterator[torch.Tensor], *, bits: int, steps: int, lr: float,
                  fresh: bool, progress: ProgressFn | None = None) -> list[float]:
    """Fit the decoder's `logsigma` head to the discretised Gaussian NLL of `batches` (images in [0,1]).

    Everything but the head is frozen. A `fresh` head (one `add_likelihood_head` made) first gets
    its bias from the data: the log of the per-channel RMS error of the first batch (a
    data-dependent initialisation as in Salimans and Kingma 2016). Returns the mean NLL in bits
    per dimension at every step.
    """
    progress = progress or null_progress
    head = vqgan.decoder.logsigma
    vqgan.requires_grad_(False).eval()
    head.requires_grad_(True)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    losses: list[float] = []
    progress({"event": "start", "task": "fit likelihood head", "total": steps, "unit": "step"})
    for step in range(steps):
        x = quantize_bits(next(batches), bits)
        _, h, mean = _mean_and_features(vqgan, x)
        if fresh and step == 0:
            with torch.no_grad():
                rms = (x - mean).pow(2).mean((0, 2, 3)).sqrt().clamp_min(0.5 / (2 ** bits - 1))  # [3]
                head[-1].bias.copy_(rms.log() + (math.log(2.0) if vqgan.signed_io else 0.0))
        loss = discretized_gaussian_nll(x, mean, _log_std(vqgan, h), bits).mean() / math.log(2.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        progress({"event": "advance", "task": "fit likelihood head", "n": 1, "metrics": {"bits_per_dim": losses[-1]}})
    progress({"event": "end", "task": "fit likelihood head",
              "metrics": {"bits_per_dim": losses[-1] if losses else float("nan")}})
    head.requires_grad_(False)
    return losses


# ---------------------------------------------------------------------------------------------
# Bits per dimension of a batch
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def bpd_of_batch(prior: torch.nn.Module, process, vqgan: torch.nn.Module, x: torch.Tensor, *, bits: int,
                 estimator: str, draws: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Images [B,3,H,W] in [0,1] -> per-image {"bpd", "prior_bits_per_token", "pixel_bits_per_dim"} [B].

    bpd = (N * nelbo + NLL / ln 2) / D: the prior's negative ELBO of the codes (bits per token,
    N tokens; an autoregressive prior's exact NLL) and the decoder's discretised Gaussian NLL (nats, D = 3HW dimensions).
    """
    x = quantize_bits(x, bits)
    codes, h, mean = _mean_and_features(vqgan, x)
    pixel_bits = discretized_gaussian_nll(x, mean, _log_std(vqgan, h), bits).flatten(1).sum(1) / math.log(2.0)  # [B]
    tokens = codes.flatten(1)  # [B, N]
    if getattr(process, "exact", False):  # an autoregressive prior: its exact NLL, no bound
        prior_bits = process.nll(prior, tokens).double()
    elif estimator == "full":
        prior_bits = process.elbo_full_sum(prior, tokens, generator=generator).double()  # [B] bits/token
    else:
        prior_bits = process.elbo_monte_carlo(prior, tokens, n_draws=draws, generator=generator)[0].double()
    dims = x[0].numel()
    return {"bpd": (tokens.shape[1] * prior_bits + pixel_bits) / dims, "prior_bits_per_token": prior_bits,
            "pixel_bits_per_dim": pixel_bits / dims}


# ---------------------------------------------------------------------------------------------
# `uvq eval bpd`
# ---------------------------------------------------------------------------------------------


def head_fingerprint(vqgan_meta: dict[str, Any], data: str, cfg, *, seed: int, max_images: int | None,
                     val_fraction: float) -> str:
    """What the fitted head depends on: the VQGAN's weights, the data and split, the fitting settings."""
    record = {"vqgan_weights_sha256": vqgan_meta.get("weights_sha256"), "data": str(data),
              "split": cfg.finetune_split, "val_fraction": val_fraction, "bits": cfg.bits,
              "steps": cfg.finetune_steps, "lr": cfg.finetune_lr, "batch_size": cfg.batch_size,
              "seed": seed, "max_images": max_images}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _cycle(make: Any) -> Iterator[torch.Tensor]:
    """Batches of images from `make()` passes, restarted at the end of each."""
    while True:
        empty = True
        for batch in make():
            empty = False
            yield batch["image"]
        if empty:
            raise UserError("the fine-tuning split holds no image; use bpd.finetune_split=val or more data")


def _load_head(path: Path, head: torch.nn.Module, fingerprint: str) -> bool:
    """Load a saved head when its fingerprint matches (True); a damaged file is refused in one line."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return False
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable likelihood head ({e}); rerun with --overwrite") from None
    own = head.state_dict()
    if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
        raise UserError(f"{path} holds a head of another shape; rerun with --overwrite")
    head.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in tensors.items()})
    return True


def evaluate_bpd(prior: str | Path, data: str, out_dir: str | Path, *, cfg=None, split: str = "val",
                 vqgan: str | Path | None = None, weights: str = "default", seed: int = 0,
                 max_images: int | None = None, device: str = "auto",
                 progress: ProgressFn | None = None) -> dict[str, Any]:
    """Fit (or reuse) the likelihood head, then the per-image bits per dimension of `split` of `data`.

    `cfg` is a `BPDConfig`. The head is saved to out_dir/likelihood_head.safetensors with its
    fingerprint; a later call whose inputs give the same fingerprint loads it instead of fitting.
    Returns keys, per-image tensors, their mean and the standard error over image groups (an image
    with its mirror copy under bpd.flip_copies), and provenance.
    """
    from safetensors.torch import save as save_safetensors

    from uvq.checkpoint import load_pair
    from uvq.config import BPDConfig, DataConfig, section_from_dict
    from uvq.data.streams import iterate_images
    from uvq.files import atomic_write_bytes
    from uvq.prior.latents import FLIP_SUFFIX
    from uvq.prior.likelihood import grouped_stderr, prior_process
    from uvq.runtime import resolve_device

    cfg = cfg or BPDConfig()
    cfg.validate("bpd")
    progress = progress or null_progress
    dev = resolve_device(device)
    pair = load_pair(prior, vqgan, weights=weights, device=dev)
    vq, vq_meta = pair.vqgan, pair.vqgan_meta
    run_data = (vq_meta.get("config") or {}).get("data")
    data_cfg = section_from_dict(DataConfig, run_data, "data") if run_data else DataConfig()
    data_cfg = dataclasses.replace(data_cfg, source=data, max_images=max_images, hflip=False)
    img_size = int(vq_meta["model_config"]["img_size"])
    fingerprint = head_fingerprint(vq_meta, data, cfg, seed=seed, max_images=max_images,
                                   val_fraction=data_cfg.val_fraction)

    # The head: reuse a saved one of the same fingerprint, else fit it (seeded) and save it.
    head_path = Path(out_dir) / HEAD_FILE
    had_head = hasattr(vq.decoder, "logsigma")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = vq.decoder.add_likelihood_head()
    reused = head_path.is_file() and _load_head(head_path, head, fingerprint)
    losses: list[float] = []
    if not reused:
        def passes():
            return iterate_images(data_cfg, img_size, split=cfg.finetune_split, batch_size=cfg.batch_size)

        batches = (b.to(dev) for b in _cycle(passes))
        losses = finetune_head(vq, batches, bits=cfg.bits, steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                               fresh=not had_head, progress=progress)
        tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        atomic_write_bytes(head_path, save_safetensors(tensors, metadata={"fingerprint": fingerprint}))

    # Bits per dimension of every image of the split (and of its mirror copy, when asked).
    process, process_info = prior_process(pair.prior_meta)
    generator = torch.Generator(device=dev).manual_seed(seed)
    keys: list[str] = []
    parts: dict[str, list[torch.Tensor]] = {"bpd": [], "prior_bits_per_token": [], "pixel_bits_per_dim": []}
    stream = iterate_images(data_cfg, img_size, split=split, batch_size=cfg.batch_size)
    task = f"bpd {split}"
    progress({"event": "start", "task": task, "total": stream.total, "unit": "img"})
    for batch in stream:
        x = batch["image"].to(dev)
        names = list(batch["key"])
        if cfg.flip_copies:
            x, names = torch.cat([x, x.flip(-1)]), names + [k + FLIP_SUFFIX for k in names]
        out = bpd_of_batch(pair.prior, process, vq, x, bits=cfg.bits, estimator=cfg.estimator, draws=cfg.draws,
                           generator=generator)
        keys += names
        for name, v in out.items():
            parts[name].append(v.cpu())
        progress({"event": "advance", "task": task, "n": len(batch["key"]),
                  "metrics": {"bits_per_dim": float(torch.cat(parts["bpd"]).mean())}})
    values = {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.float64) for k, v in parts.items()}
    n = len(keys)
    if n == 0:
        raise UserError(f"split {split!r} of {data} holds no image; pick another split or more data")
    stderr, groups = grouped_stderr(keys, values["bpd"])
    mean = float(values["bpd"].mean())
    progress({"event": "end", "task": task, "metrics": {"bits_per_dim": mean, "stderr": stderr}})
    return {"keys": keys, **values, "mean": mean, "mean_stderr": stderr, "num_images": n, "num_groups": groups,
            "mean_prior_bits_per_token": float(values["prior_bits_per_token"].mean()),
            "mean_pixel_bits_per_dim": float(values["pixel_bits_per_dim"].mean()),
            "bits": cfg.bits, "split": split, "data": str(data),
            "estimator": "exact" if process_info["exact"] else cfg.estimator,
            "draws": cfg.draws if cfg.estimator == "mc" else None, "seed": seed,
            "prior": str(pair.prior_meta["path"]), "prior_step": pair.prior_meta.get("step"),
            "vqgan": str(vq_meta["path"]), "vqgan_weights_sha256": vq_meta.get("weights_sha256"),
            "head": {"path": str(head_path), "fingerprint": fingerprint, "reused": reused,
                     "imported": had_head, "finetune_split": cfg.finetune_split, "steps": cfg.finetune_steps,
                     "lr": cfg.finetune_lr, "first_bits_per_dim": losses[0] if losses else None,
                     "last_bits_per_dim": losses[-1] if losses else None},
            "dims": int(3 * img_size * img_size), **process_info}


def bpd_csv_rows(result: dict[str, Any]) -> Iterable[list[str]]:
    """The per-image CSV of `uvq eval bpd`: header, then one row per image."""
    yield ["key", "bits_per_dim", "prior_bits_per_token", "pixel_bits_per_dim"]
    for i, k in enumerate(result["keys"]):
        yield [k, f"{float(result['bpd'][i]):.6f}", f"{float(result['prior_bits_per_token'][i]):.6f}",
               f"{float(result['pixel_bits_per_dim'][i]):.6f}"]
