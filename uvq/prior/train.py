"""`fit-prior`: train the absorbing-diffusion prior on latent shards (method section 2).

One visible loop (style.md, principle 8): setup, then per step a batch of code grids x_0, the
training loss of `cfg.prior_train.loss` (Eq. 7 by default) through `uvq.prior.absorbing`, Adam with a
linear warm-up, the EMA; then the periodic work: log (the loss AND the ELBO of the same batch in
bits per token), validate (the ELBO of the val shards with the EMA weights), plot the loss by
time step, checkpoint, pick the best checkpoint by validation ELBO.

The latents must belong to the model: their manifest's codebook size and latent shape must equal
`model.prior`'s, and when a VQGAN is named (`--vqgan` or `prior_train.vqgan`), its weights' sha256
must be the one the manifest records (the authors' code reuses a token cache named after the
dataset, whatever VQGAN made it). The manifest travels into every checkpoint's provenance, so
`uvq sample` finds the VQGAN from the prior alone.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from uvq.checkpoint import (
    load_trainer_state,
    mark_best,
    read_meta,
    weights_file,
)
from uvq.config import Config
from uvq.ema import EMA
from uvq.files import atomic_path, sha256_file
from uvq.prior.latents import LatentStream, check_tokenizer, read_manifest
from uvq.prior.likelihood import elbo_per_image
from uvq.progress import ProgressFn, null_progress
from uvq.registry import registry
from uvq.rundir import RunDir
from uvq.runtime import (
    UserError,
    amp_context,
    init_distributed,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)

# ---------------------------------------------------------------------------------------------
# Consistency of latents, recipe and VQGAN ("Consistency with the VQGAN")
# ---------------------------------------------------------------------------------------------


def vqgan_identity(vqgan: str | Path, weights: str = "default") -> dict[str, Any]:
    """A VQGAN checkpoint's sha256 (of the named weights), path and model config, without loading it."""
    meta = read_meta(vqgan)
    if meta.get("kind") != "vqgan":
        raise UserError(f"{meta['path']} is a {meta.get('kind')} checkpoint; --vqgan / prior_train.vqgan must name a VQGAN")
    which = meta["default_weights"] if weights == "default" else weights
    f = weights_file(vqgan, which)
    sha = meta.get("weights_sha256", {}).get(which) or sha256_file(f)
    return {"sha256": sha, "path": meta["path"], "weights": which, "model_config": meta["model_config"]}


def check_latents(manifest: dict[str, Any], cfg: Config, vqgan: str | Path | None = None) -> dict[str, Any] | None:
    """Refuse latents that do not fit the recipe's prior or the named VQGAN; say which field and why.

    Returns the VQGAN's identity when one is named (None otherwise).
    """
    prior = cfg.model.prior
    check_tokenizer(manifest, codebook_size=prior.codebook_size, latent_shape=prior.latent_shape,
                    against="the recipe's model.prior")
    if vqgan is None:
        return None
    # Compare with the weights the manifest says were used (EMA or raw) of the named checkpoint.
    tok = manifest.get("tokenizer") or {}
    ident = vqgan_identity(vqgan, tok.get("weights", "default"))
    mc = ident["model_config"]
    downsample = 2 ** (len(mc["ch_mult"]) - 1)
    vq_shape = [mc["img_size"] // downsample] * 2
    check_tokenizer(manifest, codebook_size=mc["codebook_size"], latent_shape=vq_shape,
                    against=f"VQGAN {ident['path']}")
    check_tokenizer(manifest, vqgan_sha256=ident["sha256"], against=f"VQGAN {ident['path']}")
    if mc["codebook_size"] != prior.codebook_size or vq_shape != list(prior.latent_shape):
        raise UserError(f"VQGAN {ident['path']} makes {vq_shape} grids of {mc['codebook_size']} codes, but the recipe's "
                        f"model.prior has latent_shape {list(prior.latent_shape)} and codebook_size {prior.codebook_size}; "
                        "make the recipe's model.prior match the VQGAN")
    return ident


# ---------------------------------------------------------------------------------------------
# The loss by time step (the authors' bar plot of L_t), drawn with PIL
# ---------------------------------------------------------------------------------------------


def loss_by_t_plot(buckets: list[dict[str, float]], path: str | Path, *, title: str = "") -> Path:
    """Bars of the tracked training loss per time-step bucket (`AbsorbingDiffusion.loss_by_time`)."""
    means = [b["loss"] for b in buckets]
    W, H, left, bottom, top = 640, 360, 56, 36, 28
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    finite = [m for m in means if math.isfinite(m)]
    ymax = max(finite) * 1.1 if finite and max(finite) > 0 else 1.0
    plot_w, plot_h = W - left - 12, H - bottom - top
    draw.line([(left, top), (left, H - bottom), (W - 12, H - bottom)], fill="black")
    bw = plot_w / max(1, len(buckets))
    for i, b in enumerate(buckets):
        if math.isfinite(b["loss"]):
            h = plot_h * b["loss"] / ymax
            draw.rectangle([left + i * bw + 1, H - bottom - h, left + (i + 1) * bw - 1, H - bottom], fill=(70, 110, 180))
        if i % max(1, len(buckets) // 8) == 0:
            draw.text((left + i * bw + 1, H - bottom + 6), str(int(b["t_lo"])), fill="black")
    for frac in (0.0, 0.5, 1.0):
        draw.text((4, H - bottom - plot_h * frac - 6), f"{ymax * frac:.3g}", fill="black")
    draw.text((left, 6), title or "training loss by time step t", fill="black")
    draw.text((W // 2 - 10, H - 16), "t", fill="black")
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


# ---------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------


def _build(cfg: Config, device: torch.device):
    from uvq.prior.absorbing import AbsorbingDiffusion

    pc, tc = cfg.model.prior, cfg.prior_train
    model = registry.get("priors", pc.name)(pc).to(device)
    T = tc.T if tc.T is not None else pc.n_tokens
    process = AbsorbingDiffusion(n_tokens=pc.n_tokens, codebook_size=pc.codebook_size, T=T, masking=tc.masking,
                                 time_sampling=tc.time_sampling)
    return model, process


def _lr(tc, step: int) -> float:
    """Linear warm-up from lr/warmup to lr over `warmup_steps`, then constant (the authors' schedule)."""
    if tc.warmup_steps <= 0:
        return tc.lr
    return tc.lr * min(1.0, (step + 1) / tc.warmup_steps)


def check_fit_prior(cfg: Config, latents_dir: str | Path, out_dir: str | Path, *, device: str = "auto",
                    vqgan: str | Path | None = None, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Everything `fit_prior` checks before it trains (for --dry-run); writes nothing."""
    manifest = read_manifest(latents_dir)
    ident = check_latents(manifest, cfg, vqgan or cfg.prior_train.vqgan)
    dev = resolve_device(device)
    out = Path(out_dir)
    if out.exists() and any(p.name != ".uvq" for p in out.iterdir()) and not (resume or overwrite):
        raise UserError(f"run directory {out} is not empty; pass --resume to continue it or --overwrite to replace it")
    if not manifest["num_samples"].get("val"):
        raise UserError(f"latents {latents_dir} have no val split; the validation ELBO needs one: "
                        "re-encode with data.val_fraction > 0")
    model, _ = _build(cfg, torch.device("cpu"))
    return {"steps": cfg.prior_train.steps, "device": str(dev), "out_dir": str(out),
            "prior_params": sum(p.numel() for p in model.parameters()),
            "num_samples": manifest["num_samples"], "vqgan": ident and ident["path"],
            "tokenizer": manifest.get("tokenizer") and manifest["tokenizer"].get("sha256")}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def fit_prior(cfg: Config, latents_dir: str | Path, out_dir: str | Path, *, device: str = "auto",
              resume: bool = False, overwrite: bool = False, vqgan: str | Path | None = None,
              progress: ProgressFn | None = None, argv: list[str] | None = None,
              max_steps: int | None = None) -> dict[str, Any]:
    """Train the prior of `cfg.model.prior` on the shards in `latents_dir`; return a summary.

    Args:
        cfg: the resolved recipe (model.prior, prior_train, run).
        latents_dir: the output of `uvq encode` (or any shards in the format of docs/latents.md).
        out_dir: the run directory (uvq.rundir): config, metrics.jsonl, images/, checkpoints/.
        resume: continue from `out_dir`'s last checkpoint exactly (weights, EMA, optimiser, RNG,
            data position, importance-sampling state, best validation ELBO).
        vqgan: a VQGAN checkpoint the latents must come from (overrides prior_train.vqgan).
        max_steps: stop after this many steps in this call (the run's target stays
            prior_train.steps), e.g. to simulate an interruption.
    """
    progress = progress or null_progress
    tc, pc, rc = cfg.prior_train, cfg.model.prior, cfg.run

    # Setup: device, process group, the latents and their consistency, the run directory.
    dev = resolve_device(device)
    dist = init_distributed(dev)
    manifest = read_manifest(latents_dir)
    ident = check_latents(manifest, cfg, vqgan or tc.vqgan)
    if not manifest["num_samples"].get("val"):
        raise UserError(f"latents {latents_dir} have no val split; the validation ELBO needs one: "
                        "re-encode with data.val_fraction > 0")
    run, _changed = RunDir.open(out_dir, cfg.to_dict(), argv=argv, device=dev, dist=dist, resume=resume,
                                overwrite=overwrite)
    seed_everything(rc.seed + dist.rank)
    model, process = _build(cfg, dev)
    ema = EMA(model, beta=tc.ema_beta, every=tc.ema_every, start=tc.ema_start) if tc.ema else None
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    stream = LatentStream(manifest, split="train", batch_size=tc.batch_size, seed=rc.seed, rank=dist.rank,
                          world_size=dist.world_size, flatten=True)
    generator = torch.Generator(device=dev).manual_seed(rc.seed * 7919 + dist.rank)
    step, best = 0, {"step": None, "val_bits_per_token": math.inf}
    tokenizer = manifest.get("tokenizer")
    provenance = {"latents": {k: v for k, v in manifest.items() if k != "shards"}, "latents_dir": str(Path(latents_dir).resolve()),
                  "tokenizer": tokenizer, "vqgan": (ident or {}).get("path") or (tokenizer or {}).get("path")}

    # Resume: every piece of state, per rank, from the last checkpoint.
    if resume and (last := run.resume_point(dist, kind="prior")) is not None:
        from safetensors.torch import load_file

        state = load_trainer_state(last)
        model.load_state_dict(load_file(str(last / "model.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step, best = int(state["step"]), dict(state["best"])
        if len(state["ranks"]) != dist.world_size:
            raise UserError(f"{last} was written by {len(state['ranks'])} processes; resume with the same number "
                            f"(this run has {dist.world_size})")
        mine = state["ranks"][dist.rank]
        stream.load_state_dict(mine["stream"])
        generator.set_state(mine["generator"])
        process.load_state_dict(mine["process"])
        set_rng_state(mine["rng"])
        run.truncate_metrics(step)
    net = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def trainer_state() -> dict[str, Any]:
        mine = {"stream": stream.state_dict(), "generator": generator.get_state(), "rng": rng_state(),
                "process": process.state_dict()}
        ranks = [mine]
        if dist.enabled:
            import torch.distributed as tdist

            ranks = [None] * dist.world_size
            tdist.all_gather_object(ranks, mine)
        return {"step": step, "optimizer": optimizer.state_dict(), "ema": ema.state_dict() if ema else None,
                "best": best, "ranks": ranks}

    def save(step_now: int) -> Path | None:
        state = trainer_state()  # a collective under torchrun: every rank takes part
        weights = {"model": model} | ({"ema": ema.model} if ema else {})
        return run.save_checkpoint(step_now, keep_last=rc.keep_last, kind="prior", model_config=cfg.to_dict()["model"]["prior"],
                                   weights=weights, config=cfg.to_dict(), provenance=provenance, trainer_state=state,
                                   extra_meta={"best": dict(best)})  # best so far: repairs a stale `best` link

    def validate() -> dict[str, Any]:
        was_training = model.training
        eval_model = ema.model if ema else model
        eval_model.eval()
        result = elbo_per_image(eval_model, process, manifest, split="val", estimator="mc", draws=tc.val_draws,
                                batch_size=tc.batch_size, max_samples=tc.val_batches * tc.batch_size,
                                device=dev, precision=tc.precision, rank=dist.rank, world_size=dist.world_size)
        model.train(was_training)
        return result

    # The loop.
    target = tc.steps if max_steps is None else min(tc.steps, step + max_steps)
    progress({"event": "start", "task": "fit-prior", "total": tc.steps, "unit": "step", "completed": step})
    model.train()
    batches = iter(stream)
    window = {"loss": 0.0, "elbo": 0.0, "n": 0, "t0": time.time()}
    last_val: dict[str, Any] = {}
    last_ckpt: Path | None = None
    while step < target:
        x0 = next(batches).to(dev, non_blocking=True)  # [B, N]
        for group in optimizer.param_groups:
            group["lr"] = _lr(tc, step)
        with amp_context(dev, tc.precision):
            out = process.training_loss(net, x0, tc.loss, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        step += 1
        if ema is not None:
            ema.update(model, step)

        # Bookkeeping: the loss and the ELBO of the same batch (bits/token); the process tracks
        # both per t itself (for importance sampling and the loss-by-t plot).
        window["loss"] += float(out["loss"].detach())
        window["elbo"] += float(out["elbo"])
        window["n"] += 1

        # Periodic work: log, validate, plot, checkpoint.
        if step % rc.log_every == 0 or step == tc.steps:
            elapsed = max(time.time() - window["t0"], 1e-9)
            metrics = {"loss": window["loss"] / window["n"], "elbo_bits_per_token": window["elbo"] / window["n"],
                       "lr": optimizer.param_groups[0]["lr"],
                       "tokens_per_s": window["n"] * tc.batch_size * pc.n_tokens * dist.world_size / elapsed}
            run.log_metrics(step, metrics)
            progress({"event": "advance", "task": "fit-prior", "n": window["n"],
                      "metrics": {"loss": metrics["loss"], "elbo": metrics["elbo_bits_per_token"], **(
                          {"val": last_val["mean"]} if last_val else {})}})
            window = {"loss": 0.0, "elbo": 0.0, "n": 0, "t0": time.time()}
        improved = False
        if step % tc.val_every == 0 or step == tc.steps:
            last_val = validate()
            run.log_metrics(step, {"val_elbo_bits_per_token": last_val["mean"], "val_stderr": last_val["mean_stderr"]})
            progress({"event": "log", "message": f"step {step}: validation ELBO {last_val['mean']:.4f} "
                                                 f"± {last_val['mean_stderr']:.4f} bits/token"})
            if last_val["mean"] < best["val_bits_per_token"]:
                best = {"step": step, "val_bits_per_token": last_val["mean"]}
                improved = True
        if run.writes and (step % rc.image_every == 0 or step == target):
            loss_by_t_plot(process.loss_by_time(buckets=min(32, process.T)), run.image_path("loss-by-t", step),
                           title=f"{tc.loss} by time step t, step {step}")
        if step % rc.ckpt_every == 0 or step == target or improved:
            last_ckpt = save(step)
            if improved and run.writes:
                mark_best(run.path, last_ckpt)
    progress({"event": "end", "task": "fit-prior", "metrics": {"step": step}})
    run.close()
    return {"out_dir": str(run.path), "steps": step, "rank": dist.rank, "best": best,
            "last_val_bits_per_token": last_val.get("mean"), "last_checkpoint": str(last_ckpt) if last_ckpt else None,
            "tokenizer": tokenizer and tokenizer.get("sha256"), "vqgan": provenance["vqgan"],
            "log2_codebook": math.log2(pc.codebook_size)}

