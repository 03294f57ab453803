"""`fit-vqgan`: training stage one, the VQGAN (docs/method.md section 1; paper sections 3.1 and 3.4).

One visible function, `fit_vqgan`, in the manner of NVlabs/edm's training loop: setup, then the
loop with the generator (autoencoder) step and the discriminator step written out, then the
periodic work (log, image grid, checkpoint). It follows the authors' train_vqgan.py:

- two Adam optimisers with torch's default betas (0.9, 0.999) and lr = 4.5e-6 x batch size,
  the discriminator's at the same lr (times `train.disc_lr_mult`, 1 by default);
- in each step the autoencoder is updated first, then the discriminator, which sees the
  reconstruction computed before the autoencoder's update (detached);
- the generator minimises L1 + w_p LPIPS + codebook terms + lambda * disc_weight * L_GAN with
  lambda the adaptive weight of Eq. 9 (clamped at `disc_weight_max`, zero before
  `disc_start_step`); the discriminator is trained with the hinge loss from the step after
  `disc_start_step` (the authors' `step > disc_start_step`);
- DiffAugment on every discriminator input (real, fake, and the fake of the generator's term);
- an EMA of the autoencoder's weights, `ema_beta` every `ema_every` steps.

Distributed data parallel under torchrun: both networks are wrapped in DistributedDataParallel,
each rank reads its own slice of the data, only rank 0 logs and writes. The discriminator's
BatchNorm becomes SyncBatchNorm under DDP on CUDA, so that its batch statistics are those of the
global batch of real (or fake) images, as in a one-GPU run of the same global batch. (PyTorch's
SyncBatchNorm needs CUDA: CPU runs under gloo keep per-rank statistics.)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uvq.config import Config
from uvq.data.streams import train_batches
from uvq.ema import EMA
from uvq.errors import Stopped
from uvq.files import check_out_dir
from uvq.images import save_grid
from uvq.progress import ProgressFn, null_progress
from uvq.registry import registry
from uvq.report import write_report
from uvq.rundir import RunDir
from uvq.runtime import (
    DistInfo,
    amp_context,
    init_distributed,
    resolve_device,
    seed_everything,
)
from uvq.stopping import StopRequest, from_run_config
from uvq.training import Meter, capture, derive_seeds, refuse_nonfinite, resolve_resume
from uvq.training import resume as resume_from
from uvq.vqgan.augment import diff_augment, parse_policy
from uvq.vqgan.losses import (
    adaptive_weight,
    build_hinge,
    build_l1_lpips,
    build_vq_codebook,
    disc_factor,
)
from uvq.vqgan.model import build_vqgan

TASK = "fit-vqgan"
# Logged means, each over the steps of its window that computed it (lpips when it is on, g_loss
# from disc_start_step, the discriminator's from the step after).
LOSS_KEYS = ("loss", "l1", "lpips", "rec", "codebook", "lambda", "g_loss", "d_loss", "logits_real", "logits_fake")


# ---------------------------------------------------------------------------------------------
# The parts, through the registry
# ---------------------------------------------------------------------------------------------


def build_parts(cfg: Config) -> tuple[nn.Module, nn.Module, nn.Module, Any, Any]:
    """(VQGAN, discriminator, L_rec = L1 + w_p LPIPS, codebook terms, hinge GAN losses) of a config."""
    vqgan = build_vqgan(cfg.model.vqgan)
    disc = registry.get("discriminators", cfg.model.discriminator.name)(cfg.model.discriminator,
                                                                        in_channels=cfg.model.vqgan.in_channels)
    # The VQGAN losses are not registry entries: one implementation each, set up by the train section.
    rec_loss = build_l1_lpips(cfg.train)
    vq_loss = build_vq_codebook(cfg.train)
    gan = build_hinge(cfg.train)
    return vqgan, disc, rec_loss, vq_loss, gan


# ---------------------------------------------------------------------------------------------
# Checks that run before anything is written (also `uvq fit-vqgan --dry-run`)
# ---------------------------------------------------------------------------------------------


def check_fit_vqgan(cfg: Config, out_dir: str | Path, *, device: str = "auto", resume: bool = False,
                    overwrite: bool = False) -> dict[str, Any]:
    """Validate a training run without writing anything: device, output directory, registry names,
    the networks and losses (LPIPS weights included), the data source. Raises UserError."""
    dev = resolve_device(device)
    out = Path(out_dir)
    check_out_dir(out, command=TASK, resume=resume, overwrite=overwrite, inputs=(cfg.data.source,))
    vqgan, disc, _, _, _ = build_parts(cfg)  # LPIPS weights and registry names checked here
    parse_policy(cfg.train.diffaug_policy)
    train_batches(cfg.data, cfg.model.vqgan.img_size, cfg.train.batch_size, seed=cfg.run.seed, rank=0,
                  world_size=1).close()
    return {"out_dir": str(out), "device": str(dev), "steps": cfg.train.steps,
            "vqgan_params": sum(p.numel() for p in vqgan.parameters()),
            "disc_params": sum(p.numel() for p in disc.parameters()),
            "resume": bool(resume and (out / "checkpoints" / "last").exists())}


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


def fit_vqgan(cfg: Config, out_dir: str | Path, *, device: str = "auto", resume: bool | str = False,
              overwrite: bool = False, progress: ProgressFn | None = None, argv: list[str] | None = None,
              max_steps: int | None = None, stop: StopRequest | None = None) -> dict[str, Any]:
    """Train the VQGAN of `cfg` into the run directory `out_dir` and return a summary.

    Args:
        cfg: the resolved config; `model.vqgan`, `model.discriminator`, `train`, `data`, `run`.
        out_dir: the run directory (uvq.rundir): config, command, env, metrics, images/, checkpoints/.
        device: "auto", "cpu", "cuda" or "cuda:N" (LOCAL_RANK under torchrun).
        resume: continue `out_dir` from its last checkpoint exactly (weights, both optimisers,
            discriminator, EMA, GradScalers, RNG states and data position of every rank); "auto"
            continues when `out_dir` holds a run and starts one otherwise.
        overwrite: replace the contents of a non-empty `out_dir`.
        progress: callback for progress events (uvq.progress); only rank 0 sends any.
        argv: the command line, recorded in command.txt.
        max_steps: stop after this many steps of this call (a checkpoint is written), e.g. to
            fit a time limit; None trains to `train.steps`.
        stop: the request to stop early (uvq.stopping; the CLI's signal handlers set it). On a
            signal or at run.time_limit the loop saves a checkpoint after the step in progress
            and raises uvq.errors.Stopped.

    Returns: steps, images/s, final losses, code usage and perplexity, bad images skipped, the
    last checkpoint and the last reconstruction grid.
    """
    tc, rc, vc = cfg.train, cfg.run, cfg.model.vqgan
    resume = resolve_resume(resume, out_dir)
    stop = from_run_config(stop, rc)

    # Setup: device, process group, seeds.
    dev = resolve_device(device)
    dist = init_distributed(dev, cfg.run.dist_timeout_s)
    progress = (progress or null_progress) if dist.is_main else null_progress
    cuda = dev.type == "cuda"
    precision = tc.precision if cuda else "fp32"  # the CPU always trains in fp32 (exact resume)
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels (as the authors)
    check_out_dir(out_dir, command=TASK, resume=resume, overwrite=overwrite, inputs=(cfg.data.source,))  # fail fast
    seeds = derive_seeds(rc.seed, dist.rank)
    seed_everything(seeds.global_)  # DDP broadcasts rank 0's initial weights to the other ranks

    # The networks and losses, built before anything is written (a missing LPIPS file fails here).
    memory_format = torch.channels_last if cuda and tc.channels_last else torch.contiguous_format
    vqgan, disc, rec_loss, vq_loss, gan = build_parts(cfg)
    vqgan = vqgan.to(dev, memory_format=memory_format).train()
    if dist.enabled and cuda:
        # One BatchNorm over the global batch: a 2-GPU run then matches a 1-GPU run of twice the batch.
        # (PyTorch's SyncBatchNorm runs on CUDA only; CPU/gloo runs keep per-rank batch statistics,
        # and DDP broadcasts rank 0's running statistics.)
        disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    disc = disc.to(dev, memory_format=memory_format).train()
    rec_loss = rec_loss.to(dev, memory_format=memory_format).train()
    aug_gen = torch.Generator(device=dev).manual_seed(seeds.generator)
    augment = functools.partial(diff_augment, policy=tc.diffaug_policy, generator=aug_gen)

    # Two Adam optimisers, written out (the authors': default betas, the same lr for both).
    lr = tc.learning_rate(dist.world_size)  # 4.5e-6 x the global batch unless train.lr is set
    fused = True if cuda else None  # one kernel per step for all parameters on CUDA
    opt_ae = torch.optim.Adam(vqgan.parameters(), lr=lr, betas=tuple(tc.betas), fused=fused)
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr * tc.disc_lr_mult, betas=tuple(tc.betas), fused=fused)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    d_scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    # Data: this rank's slice of an endless, resumable stream of [B,3,H,W] images in [0,1].
    batches = train_batches(cfg.data, vc.img_size, tc.batch_size, seed=seeds.data, rank=dist.rank,
                            world_size=dist.world_size, progress=progress)

    # The run directory (rank 0 writes; every rank agrees on errors).
    run, changed = RunDir.open(out_dir, cfg.to_dict(), command=TASK, argv=argv, device=dev, dist=dist, resume=resume,
                               overwrite=overwrite, inputs=(cfg.data.source,))
    if changed:
        progress({"event": "log", "message": f"resuming with a changed config: {', '.join(changed[:8])}"})

    ae_net, d_net = vqgan, disc
    if dist.enabled:
        ids = [dev.index] if cuda else None
        # The likelihood head (off when training) gets no gradient: tell DDP not to wait for it.
        ae_net = nn.parallel.DistributedDataParallel(vqgan, device_ids=ids, find_unused_parameters=vc.likelihood_head)
        d_net = nn.parallel.DistributedDataParallel(disc, device_ids=ids)
    # The EMA copies the weights after DDP's broadcast, so every rank's copy starts from rank 0's.
    ema = EMA(vqgan, beta=tc.ema_beta, every=tc.ema_every, start=tc.ema_start) if tc.ema else None

    # The logging window: device-side sums (uvq.training.Meter), no host sync until a log step.
    meter = Meter(LOSS_KEYS, dev, codebook_size=vc.codebook_size)
    step = 0

    # Resume: every piece of state, per rank, from the last checkpoint (uvq.training.resume).
    resumable = {"optimizers": {"ae": opt_ae, "d": opt_d}, "scalers": {"ae": scaler, "d": d_scaler}, "ema": ema,
                 "generators": {"augment": aug_gen}, "data": batches, "meter": meter, "modules": {"disc": disc}}
    if resume:
        _, state = resume_from(run, dist, kind="vqgan", model=vqgan, progress=progress, **resumable)
        step = state.step if state is not None else 0

    def trainer_state() -> dict[str, Any]:
        """Resumable state; a collective under torchrun (each rank's RNG, data position, window)."""
        replica = {"vqgan": _digest(vqgan), "disc": _digest(disc)} if dist.enabled else None
        state = capture(step, dist, extra={"replica": replica}, **resumable)
        # Each rank's digest of its replicas' parameters: DDP must have kept them identical.
        if any(r.extra["replica"] != state.ranks[0].extra["replica"] for r in state.ranks):
            progress({"event": "warn", "message": f"step {step}: the ranks' weights differ (DDP desynchronised); "
                                                  "the checkpoint holds rank 0's"})
        return state.to_dict()

    provenance = {"data_source": cfg.data.source, "data": dataclasses.asdict(cfg.data), "seed": rc.seed,
                  "world_size": dist.world_size, "batch_size_per_rank": tc.batch_size,
                  "trained_by": f"uvq {TASK}"}

    def save(step_now: int) -> Path | None:
        nonlocal saved_step
        t0 = time.monotonic()
        state = trainer_state()  # every rank takes part
        weights: dict[str, Any] = {"model": vqgan} | ({"ema": ema.model} if ema is not None else {})
        saved_step = step_now
        path = run.save_checkpoint(step_now, keep_last=rc.keep_last, kind="vqgan",
                                   model_config=dataclasses.asdict(vc), weights=weights, config=cfg.to_dict(),
                                   provenance={**provenance, "images_seen": step_now * tc.batch_size * dist.world_size},
                                   trainer_state=state)
        stop.note_write(time.monotonic() - t0)  # the time limit keeps room for the next write
        return path

    def grid(x: torch.Tensor, xrec: torch.Tensor, step_now: int) -> Path | None:
        """Inputs, reconstructions (and EMA reconstructions) in rows; rank 0 only."""
        if not dist.is_main:
            return None
        n = min(8, x.shape[0])
        rows = [x[:n].float(), xrec[:n].detach().float().clamp(0, 1)]
        if ema is not None:
            with torch.no_grad(), amp_context(dev, precision):
                rows.append(ema.model(x[:n])[0].float().clamp(0, 1))
        labels = ["input", "reconstruction", "EMA reconstruction"][: len(rows)]
        return save_grid(torch.cat(rows), run.image_path("recon", step_now), nrow=n, row_labels=labels)

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------
    target = tc.steps if max_steps is None else min(tc.steps, step + max_steps)
    images_per_step = tc.batch_size * dist.world_size
    progress({"event": "start", "task": TASK, "total": tc.steps, "unit": "step", "completed": step})
    logged: dict[str, Any] = {}
    last_ckpt: Path | None = None
    last_grid: Path | None = None
    t_start = t_window = t_event = time.time()
    steps_run = steps_window = pending = 0
    saved_step = step
    stop.watch()  # from here a first signal asks the loop to stop after its step
    while step < target:
        x = next(batches)["image"].to(dev, non_blocking=True).contiguous(memory_format=memory_format)  # [B,3,H,W]
        # `step` counts the steps done, i.e. the authors' 0-based step index: lambda is on from
        # disc_start_step (their adopt_weight), D learns from the step after (their `step > disc_start_step`).
        gan_on = disc_factor(step, tc.disc_start_step) > 0
        train_d = step > tc.disc_start_step

        # Generator step: L = L_rec + codebook terms + lambda * disc_weight * L_GAN (Eq. 5, Eq. 9).
        disc.requires_grad_(False)  # the GAN term's gradient must reach the decoder only
        with amp_context(dev, precision):
            xrec, codes, qinfo = ae_net(x)  # [B,3,H,W], [B,h,w]
            rec, parts = rec_loss(x, xrec)  # l1_weight |x - x_hat|_1 + w_p LPIPS, batch means
            cb = vq_loss(qinfo)  # codebook_weight * (codebook + commitment terms, beta placed per recipe)
            g_loss = gan.g_loss(disc(augment(xrec))) if gan_on else None  # -mean D(aug(x_hat))
        if gan_on:
            # lambda = min(|grad_GL L_rec| / (|grad_GL L_GAN| + delta), lambda_max): local autograd.grad,
            # which DDP's gradient hooks do not see (they fire on the backward below only).
            lam = adaptive_weight(rec.float(), g_loss.float(), vqgan.last_layer, lambda_max=tc.disc_weight_max)
            loss = rec + cb + tc.disc_weight * lam * g_loss
        else:
            lam = torch.zeros((), device=dev)
            loss = rec + cb
        opt_ae.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tc.grad_clip is not None:
            scaler.unscale_(opt_ae)
            nn.utils.clip_grad_norm_(vqgan.parameters(), tc.grad_clip)
        scaler.step(opt_ae)
        scaler.update()

        # Discriminator step: hinge loss on augmented real and (detached) fake images.
        if train_d:
            disc.requires_grad_(True)
            with amp_context(dev, precision):
                logits_real = d_net(augment(x))
                logits_fake = d_net(augment(xrec.detach()))
                d_loss = gan.d_loss(logits_real, logits_fake)  # 0.5 (mean relu(1-real) + mean relu(1+fake))
            opt_d.zero_grad(set_to_none=True)
            d_scaler.scale(d_loss).backward()
            if tc.grad_clip is not None:
                d_scaler.unscale_(opt_d)
                nn.utils.clip_grad_norm_(disc.parameters(), tc.grad_clip)
            d_scaler.step(opt_d)
            d_scaler.update()

        step += 1
        steps_run += 1
        steps_window += 1
        pending += 1
        if ema is not None:
            ema.update(vqgan, step)

        # Bookkeeping: the meter's sums stay on the device; code histogram for usage and perplexity.
        meter.add("loss", loss)
        meter.add("l1", parts["l1"])
        if "perceptual" in parts:
            meter.add("lpips", parts["perceptual"])
        meter.add("rec", rec)
        meter.add("codebook", cb)
        meter.add("lambda", lam)
        if g_loss is not None:
            meter.add("g_loss", g_loss)
        if train_d:
            meter.add("d_loss", d_loss)
            meter.add("logits_real", logits_real.detach().float().mean())
            meter.add("logits_fake", logits_fake.detach().float().mean())
        meter.count_codes(codes)

        # Periodic work: log, image grid, checkpoint.
        final = step == target
        # A stop before train.steps (max_steps) does not log: the checkpoint keeps the window, so a
        # resumed run logs the same rows as one that never stopped.
        if step % rc.log_every == 0 or step == tc.steps:
            logged = meter.reduce(dist)
            refuse_nonfinite(logged, step, last_ckpt)
            elapsed = max(time.time() - t_window, 1e-9)
            logged["images_per_s"] = steps_window * images_per_step / elapsed
            logged["lr"] = opt_ae.param_groups[0]["lr"]
            bad = _bad_images(batches, dist)
            logged["bad_images"] = bad
            run.log_metrics(step, logged)
            meter.reset()
            t_window, steps_window = time.time(), 0
        if step % rc.image_every == 0 or final:
            last_grid = grid(x, xrec, step) or last_grid
        if step % rc.ckpt_every == 0 or final:
            if not meter.finite(dist):  # the window since the last log: never save diverged weights
                refuse_nonfinite({"loss": math.nan}, step, last_ckpt)
            last_ckpt = save(step) or last_ckpt
            if rc.report and run.writes:
                write_report(run.path, lock=False)  # run.report: the page follows the checkpoints (we hold the lock)
        now = time.time()
        if now - t_event >= 0.5 or final or step % rc.log_every == 0:
            shown = {k: logged[k] for k in ("l1", "lpips", "d_loss", "usage", "images_per_s") if k in logged}
            progress({"event": "advance", "task": TASK, "n": pending, "metrics": shown})
            pending, t_event = 0, now

        # Stop early on a signal or the time limit: the checkpoint of this step is the resume point.
        reason = stop.should_stop(dist, dev, step=step, every=rc.stop_check_every) if not final else None
        if reason is not None:
            if saved_step != step:
                if not meter.finite(dist):
                    refuse_nonfinite({"loss": math.nan}, step, last_ckpt)
                last_ckpt = save(step) or last_ckpt
            progress({"event": "advance", "task": TASK, "n": pending})
            run.close()
            raise Stopped(reason, f"checkpoint {last_ckpt or run.last_checkpoint()} holds it", step=step, out=out_dir)

    elapsed = max(time.time() - t_start, 1e-9)
    summary = {
        "out_dir": str(run.path), "steps": step, "steps_this_run": steps_run,
        "images_per_s": steps_run * images_per_step / elapsed, "steps_per_s": steps_run / elapsed,
        "seconds": elapsed, "world_size": dist.world_size, "rank": dist.rank, "device": str(dev),
        "precision": precision,
        "final": {k: logged[k] for k in LOSS_KEYS if k in logged},
        "code_usage": logged.get("usage"), "perplexity": logged.get("perplexity"),
        "bad_images": _bad_images(batches, dist),
        "last_checkpoint": str(last_ckpt or run.last_checkpoint() or ""),
        "last_grid": str(last_grid or ""),
    }
    progress({"event": "end", "task": TASK, "metrics": {k: summary["final"][k] for k in ("l1", "d_loss")
                                                          if k in summary["final"]}})
    run.close()
    return summary


# ---------------------------------------------------------------------------------------------
# Helpers of the periodic work
# ---------------------------------------------------------------------------------------------


def _digest(module: nn.Module) -> str:
    """sha256 of a module's parameters (not buffers: BatchNorm running statistics are per rank on CPU)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _bad_images(batches: Any, dist: DistInfo) -> int:
    """Unreadable images skipped so far, summed over ranks."""
    bad = batches.stats.skipped  # the stream warns about each one through `progress` as it skips it
    if dist.enabled:
        import torch.distributed as tdist

        t = torch.tensor([bad], dtype=torch.int64)
        if tdist.get_backend() == "nccl":
            t = t.cuda()
        tdist.all_reduce(t)
        bad = int(t.item())
    return bad

