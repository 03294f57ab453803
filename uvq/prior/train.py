"""`fit-prior`: train the absorbing-diffusion prior on latent shards (docs/method.md section 2).

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

from uvq.checkpoint import mark_best, read_meta, weights_file
from uvq.config import Config
from uvq.ema import EMA
from uvq.errors import Stopped
from uvq.files import check_out_dir, sha256_file
from uvq.prior.latents import LatentStream, check_tokenizer, count_shard, load_codes, read_manifest
from uvq.prior.likelihood import elbo_per_image
from uvq.progress import ProgressFn, null_progress
from uvq.registry import registry
from uvq.report import write_report
from uvq.rundir import RunDir
from uvq.runtime import (
    UserError,
    amp_context,
    init_distributed,
    resolve_device,
    seed_everything,
)
from uvq.stopping import StopRequest, from_run_config
from uvq.training import Meter, capture, derive_seeds, refuse_nonfinite, resolve_resume
from uvq.training import resume as resume_from

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
# The loss by time step (the authors' bar plot of L_t), drawn with matplotlib
# ---------------------------------------------------------------------------------------------


def loss_by_t_plot(buckets: list[dict[str, float]], path: str | Path, *, title: str = "") -> Path:
    """Bars of the tracked training loss per time-step bucket (`AbsorbingDiffusion.loss_by_time`)."""
    from uvq.images import figure, save_figure

    fig = figure(6.4, 3.6)
    ax = fig.add_subplot()
    lo = [b["t_lo"] for b in buckets]
    widths = [b["t_hi"] - b["t_lo"] + 1 for b in buckets]  # t_hi is inclusive
    loss = [b["loss"] if math.isfinite(b["loss"]) else 0.0 for b in buckets]  # an untracked bucket: no bar
    ax.bar(lo, loss, width=widths, align="edge", color="#4a6fb4", edgecolor="white", linewidth=0.5)
    ax.set_xlabel("time step t (a larger t masks more tokens)")
    ax.set_ylabel("tracked training loss (bits)")
    ax.set_title(title or "training loss by time step t", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------


def _build(cfg: Config, device: torch.device):
    pc, tc = cfg.model.prior, cfg.prior_train
    model = registry.get("priors", pc.name)(pc).to(device)
    process = registry.get("processes", tc.process)(pc, tc)  # absorbing.v1 (the paper's) or autoregressive.v1
    return model, process


def _lr(tc, step: int) -> float:
    """Linear warm-up from lr/warmup to lr over `warmup_steps`, then constant (the authors' schedule)."""
    if tc.warmup_steps <= 0:
        return tc.lr
    return tc.lr * min(1.0, (step + 1) / tc.warmup_steps)


def _shard_paths(manifest: dict[str, Any], split: str) -> list[Path]:
    return [Path(manifest["root"]) / s["name"] for s in manifest["shards"] if s["split"] == split]


def check_splits(manifest: dict[str, Any], latents_dir: str | Path) -> None:
    """Refuse latents whose train or val split holds no sample (an endless stream over empty shards
    would hang, and a validation ELBO over none is NaN), or any shard whose codes do not fit the
    manifest (shape, dtype, codes >= K), before the run directory is written. Every shard is read
    once (latents are small: 70k FFHQ grids of 16x16 are 36 MB), so a manifest is not trusted."""
    for split in ("train", "val"):
        for path in _shard_paths(manifest, split):
            load_codes(manifest, path)  # raises a UserError naming the shard
        shards = [Path(manifest["root"]) / s["name"] for s in manifest["shards"] if s["split"] == split]
        if not manifest["num_samples"].get(split) or not shards:
            why = "the validation ELBO needs one: re-encode with data.val_fraction > 0" if split == "val" else \
                "re-encode the training images"
            raise UserError(f"latents {latents_dir} have no {split} split; {why}")
        if not any(count_shard(f) for f in shards):
            raise UserError(f"latents {latents_dir}: the manifest counts {manifest['num_samples'][split]} {split} "
                            f"samples but its {len(shards)} {split} shards hold none; re-run `uvq encode` into a new --out")


def check_fit_prior(cfg: Config, latents_dir: str | Path, out_dir: str | Path, *, device: str = "auto",
                    vqgan: str | Path | None = None, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Everything `fit_prior` checks before it trains (for --dry-run); writes nothing."""
    out = Path(out_dir)
    check_out_dir(out, command="fit-prior", resume=resume, overwrite=overwrite,
                  inputs=(latents_dir, vqgan or cfg.prior_train.vqgan))
    manifest = read_manifest(latents_dir)
    ident = check_latents(manifest, cfg, vqgan or cfg.prior_train.vqgan)
    dev = resolve_device(device)
    check_splits(manifest, latents_dir)
    model, _ = _build(cfg, torch.device("cpu"))
    return {"steps": cfg.prior_train.steps, "device": str(dev), "out_dir": str(out),
            "prior_params": sum(p.numel() for p in model.parameters()),
            "num_samples": manifest["num_samples"], "vqgan": ident and ident["path"],
            "tokenizer": manifest.get("tokenizer") and manifest["tokenizer"].get("sha256")}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def fit_prior(cfg: Config, latents_dir: str | Path, out_dir: str | Path, *, device: str = "auto",
              resume: bool | str = False, overwrite: bool = False, vqgan: str | Path | None = None,
              progress: ProgressFn | None = None, argv: list[str] | None = None,
              max_steps: int | None = None, stop: StopRequest | None = None) -> dict[str, Any]:
    """Train the prior of `cfg.model.prior` on the shards in `latents_dir`; return a summary.

    Args:
        cfg: the resolved recipe (model.prior, prior_train, run).
        latents_dir: the output of `uvq encode` (or any shards in the format of docs/latents.md).
        out_dir: the run directory (uvq.rundir): config, metrics.jsonl, images/, checkpoints/.
        resume: continue from `out_dir`'s last checkpoint exactly (weights, EMA, optimiser, RNG,
            data position, importance-sampling state, best validation ELBO); "auto" continues
            when `out_dir` holds a run and starts one otherwise (uvq.training.resolve_resume).
        vqgan: a VQGAN checkpoint the latents must come from (overrides prior_train.vqgan).
        max_steps: stop after this many steps in this call (the run's target stays
            prior_train.steps), e.g. to simulate an interruption.
        stop: the request to stop early (uvq.stopping; the CLI's signal handlers set it). On a
            signal or at run.time_limit the loop saves a checkpoint after the step in progress
            and raises uvq.errors.Stopped.
    """
    progress = progress or null_progress
    tc, pc, rc = cfg.prior_train, cfg.model.prior, cfg.run
    resume = resolve_resume(resume, out_dir)
    stop = from_run_config(stop, rc)

    # Setup: device, process group, the latents and their consistency, the run directory.
    dev = resolve_device(device)
    dist = init_distributed(dev, cfg.run.dist_timeout_s)
    progress = progress if dist.is_main else null_progress
    check_out_dir(out_dir, command="fit-prior", resume=resume, overwrite=overwrite,
                  inputs=(latents_dir, vqgan or tc.vqgan))  # fail fast (RunDir.open checks again and claims)
    manifest = read_manifest(latents_dir)
    ident = check_latents(manifest, cfg, vqgan or tc.vqgan)
    check_splits(manifest, latents_dir)
    run, _changed = RunDir.open(out_dir, cfg.to_dict(), command="fit-prior", argv=argv, device=dev, dist=dist,
                                resume=resume, overwrite=overwrite, inputs=(latents_dir, vqgan or tc.vqgan))
    seeds = derive_seeds(rc.seed, dist.rank)
    seed_everything(seeds.global_)
    model, process = _build(cfg, dev)
    net = model
    if dist.enabled:  # DDP broadcasts rank 0's initial weights; the EMA copies them after
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    ema = EMA(model, beta=tc.ema_beta, every=tc.ema_every, start=tc.ema_start) if tc.ema else None
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    # fp16 needs loss scaling (as in fit-vqgan); bf16 and fp32 do not, and the CPU always runs fp32.
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and tc.precision == "fp16")
    stream = LatentStream(manifest, split="train", batch_size=tc.batch_size, seed=seeds.data, rank=dist.rank,
                          world_size=dist.world_size, flatten=True)
    generator = torch.Generator(device=dev).manual_seed(seeds.generator)
    meter = Meter(("loss", "elbo"), dev)
    step, best = 0, {"step": None, "val_bits_per_token": math.inf}
    tokenizer = manifest.get("tokenizer")
    provenance = {"latents": {k: v for k, v in manifest.items() if k != "shards"}, "latents_dir": str(Path(latents_dir).resolve()),
                  "tokenizer": tokenizer, "vqgan": (ident or {}).get("path") or (tokenizer or {}).get("path")}

    # Resume: every piece of state, per rank, from the last checkpoint (uvq.training.resume).
    parts = {"optimizers": {"model": optimizer}, "scalers": {"model": scaler}, "ema": ema,
             "generators": {"process": generator}, "data": stream, "meter": meter}
    if resume:
        _, state = resume_from(run, dist, kind="prior", model=model, progress=progress, **parts)
        if state is not None:
            step, best = state.step, dict(state.best)
            process.load_state_dict(state.ranks[dist.rank].extra["process"])

    def save(step_now: int) -> Path | None:
        nonlocal saved_step
        t0 = time.monotonic()
        state = capture(step_now, dist, best=best, extra={"process": process.state_dict()}, **parts)  # a collective
        weights = {"model": model} | ({"ema": ema.model} if ema else {})
        saved_step = step_now
        path = run.save_checkpoint(step_now, keep_last=rc.keep_last, kind="prior", model_config=cfg.to_dict()["model"]["prior"],
                                   weights=weights, config=cfg.to_dict(), provenance=provenance,
                                   trainer_state=state.to_dict(),
                                   extra_meta={"best": dict(best)})  # best so far: repairs a stale `best` link
        stop.note_write(time.monotonic() - t0)  # the time limit keeps room for the next write
        return path

    def validate() -> dict[str, Any]:
        was_training = model.training
        eval_model = ema.model if ema else model
        eval_model.eval()
        estimator = "exact" if getattr(process, "exact", False) else "mc"  # the AR prior's NLL is exact
        result = elbo_per_image(eval_model, process, manifest, split="val", estimator=estimator, draws=tc.val_draws,
                                batch_size=tc.batch_size, max_samples=tc.val_batches * tc.batch_size,
                                device=dev, precision=tc.precision, rank=dist.rank, world_size=dist.world_size)
        model.train(was_training)
        return result

    # The loop: no host sync per step (the meter keeps its sums on the device).
    target = tc.steps if max_steps is None else min(tc.steps, step + max_steps)
    progress({"event": "start", "task": "fit-prior", "total": tc.steps, "unit": "step", "completed": step})
    model.train()
    batches = iter(stream)
    last_val: dict[str, Any] = {}
    last_ckpt: Path | None = None
    saved_step = step
    t_window, steps_window, pending = time.time(), 0, 0
    stop.watch()  # from here a first signal asks the loop to stop after its step
    while step < target:
        x0 = next(batches).to(dev, non_blocking=True)  # [B, N]
        for group in optimizer.param_groups:
            group["lr"] = _lr(tc, step)
        with amp_context(dev, tc.precision):
            out = process.training_loss(net, x0, tc.loss, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        if tc.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        steps_window += 1
        pending += 1
        if ema is not None:
            ema.update(model, step)

        # Bookkeeping: the loss and the ELBO of the same batch (bits/token); the process tracks
        # both per t itself (for importance sampling and the loss-by-t plot).
        meter.add("loss", out["loss"])
        meter.add("elbo", out["elbo"])

        # Periodic work: log, validate, plot, checkpoint. A step's training means and its
        # validation ELBO share one metrics.jsonl row (a step is never written twice).
        row: dict[str, Any] = {}
        if step % rc.log_every == 0 or step == tc.steps:
            means = meter.reduce(dist)
            refuse_nonfinite(means, step, last_ckpt)
            elapsed = max(time.time() - t_window, 1e-9)
            metrics = {"loss": means["loss"], "elbo_bits_per_token": means["elbo"],
                       "lr": optimizer.param_groups[0]["lr"],
                       "tokens_per_s": steps_window * tc.batch_size * pc.n_tokens * dist.world_size / elapsed}
            row.update(metrics)
            progress({"event": "advance", "task": "fit-prior", "n": pending,
                      "metrics": {"loss": metrics["loss"], "elbo": metrics["elbo_bits_per_token"], **(
                          {"val": last_val["mean"]} if last_val else {})}})
            meter.reset()
            t_window, steps_window, pending = time.time(), 0, 0
        improved = False
        if step % tc.val_every == 0 or step == tc.steps:
            last_val = validate()
            name = getattr(process, "likelihood", "elbo")  # "nll" for the autoregressive prior
            row.update({f"val_{name}_bits_per_token": last_val["mean"], "val_stderr": last_val["mean_stderr"]})
            progress({"event": "log", "message": f"step {step}: validation {name.upper()} {last_val['mean']:.4f} "
                                                 f"± {last_val['mean_stderr']:.4f} bits/token"})
            if last_val["mean"] < best["val_bits_per_token"]:
                best = {"step": step, "val_bits_per_token": last_val["mean"]}
                improved = True
        if row:
            run.log_metrics(step, row)
        if run.writes and hasattr(process, "loss_by_time") and (step % rc.image_every == 0 or step == target):
            loss_by_t_plot(process.loss_by_time(buckets=min(32, process.T)), run.image_path("loss-by-t", step),
                           title=f"{tc.loss} by time step t, step {step}")
        if step % rc.ckpt_every == 0 or step == target or improved:
            if not meter.finite(dist):  # the window since the last log: never save diverged weights
                refuse_nonfinite({"loss": math.nan}, step, last_ckpt)
            last_ckpt = save(step) or last_ckpt
            if improved and run.writes:
                mark_best(run.path, last_ckpt)
            if rc.report and run.writes:
                write_report(run.path, lock=False)  # run.report: the page follows the checkpoints (we hold the lock)

        # Stop early on a signal or the time limit: the checkpoint of this step is the resume point.
        reason = stop.should_stop(dist, dev, step=step, every=rc.stop_check_every) if step < target else None
        if reason is not None:
            if saved_step != step:
                if not meter.finite(dist):
                    refuse_nonfinite({"loss": math.nan}, step, last_ckpt)
                last_ckpt = save(step) or last_ckpt
            progress({"event": "advance", "task": "fit-prior", "n": pending})
            run.close()
            raise Stopped(reason, f"checkpoint {last_ckpt or run.last_checkpoint()} holds it", step=step, out=out_dir)
    if pending:
        progress({"event": "advance", "task": "fit-prior", "n": pending})
    progress({"event": "end", "task": "fit-prior", "metrics": {"step": step}})
    run.close()
    return {"out_dir": str(run.path), "steps": step, "rank": dist.rank, "best": best,
            "last_val_bits_per_token": last_val.get("mean"), "last_checkpoint": str(last_ckpt) if last_ckpt else None,
            "tokenizer": tokenizer and tokenizer.get("sha256"), "vqgan": provenance["vqgan"],
            "log2_codebook": math.log2(pc.codebook_size), "process": tc.process,
            "val_metric": "exact NLL" if getattr(process, "exact", False) else "ELBO"}

