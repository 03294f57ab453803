"""The whole method in one call: fit-vqgan, encode, fit-prior, sample (and eval), with fingerprints.

    RUN/
      .uvq              ownership record: uvq made this directory, and what it wrote (uvq.files)
      .uvq.lock         held while a pipeline call runs here (one writer per directory)
      pipeline.json     per stage: fingerprint, status (running | done), output hash, timing
      config.yaml       the resolved recipe of the latest call
      vqgan/            fit-vqgan's run directory       (stage one, docs/method.md section 1)
      latents/          encode's shards and manifest     (docs/method.md section 2)
      prior/            fit-prior's run directory        (docs/method.md section 2)
      samples/          uvq sample's output              (docs/method.md section 3)
      eval/             metrics report, when the recipe's eval.metrics is non-empty (docs/method.md section 6)
      report.html       one self-contained page of every stage, written at the end (uvq.report)

A stage's fingerprint is the hash of the config sections it reads plus the output hash of the
stage before it. A stage whose record is "done" with the same fingerprint, and whose output is
still there and unchanged, is skipped; a changed fingerprint re-runs the stage (and, since its
output hash changes, the stages after it). A stage left "running" by an interrupted call with
the same fingerprint resumes: the trainers from their last checkpoint, encode from its finished
shards; sampling starts again (it is the cheap stage).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uvq.config import Config, to_yaml
from uvq.errors import Stopped
from uvq.files import (
    OutDir,
    atomic_write_json,
    atomic_write_text,
    check_out_dir,
    claim_out_dir,
    sha256_file,
)
from uvq.progress import ProgressFn, null_progress
from uvq.report import write_report
from uvq.runtime import UserError
from uvq.stopping import StopRequest, from_run_config

STAGES = ("vqgan", "latents", "prior", "samples", "eval")
STAGE_COMMANDS = {"vqgan": "fit-vqgan", "latents": "encode", "prior": "fit-prior", "samples": "sample", "eval": "eval"}
STATE_FILE = "pipeline.json"
FINGERPRINT_VERSION = 1  # bump when the meaning of a stage's output changes


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# What each stage reads, and how its output is identified
# ---------------------------------------------------------------------------------------------


def stage_inputs(cfg: Config, stage: str) -> dict[str, Any]:
    """The config sections a stage's output depends on (logging and checkpoint intervals excluded)."""
    d = cfg.to_dict()
    seed = d["run"]["seed"]
    if stage == "vqgan":
        return {"data": d["data"], "vqgan": d["model"]["vqgan"], "discriminator": d["model"]["discriminator"],
                "train": d["train"], "seed": seed}
    if stage == "latents":
        return {"data": d["data"], "encode": d["encode"]}
    if stage == "prior":
        return {"prior": d["model"]["prior"], "prior_train": d["prior_train"], "seed": seed}
    if stage == "samples":
        return {"sample": d["sample"], "seed": seed}
    if stage == "eval":
        return {"eval": d["eval"], "reference": d["data"]["source"]}
    raise ValueError(f"unknown stage {stage!r}")


def fingerprint(cfg: Config, stage: str, upstream: str | None) -> str:
    """hash(stage, its config sections, the upstream stage's output hash, format version)."""
    return _hash({"stage": stage, "inputs": stage_inputs(cfg, stage), "upstream": upstream,
                  "version": FINGERPRINT_VERSION})


def output_hash(run: Path, stage: str) -> str | None:
    """A hash of a stage's finished output, or None when it is missing or incomplete."""
    from uvq.checkpoint import read_meta

    path = run / stage
    try:
        if stage in ("vqgan", "prior"):
            meta = read_meta(path)  # best, then last
            return _hash({"path": Path(meta["path"]).name, "weights": meta.get("weights_sha256")})
        if stage == "latents":
            manifest = json.loads((path / "manifest.json").read_text())
            return _hash([(s["name"], s.get("sha256")) for s in manifest["shards"]])
        if stage == "samples":
            return sha256_file(path / "samples.json")
        if stage == "eval":
            return sha256_file(path / "report.json")
    except (UserError, OSError, KeyError, json.JSONDecodeError):
        return None
    raise ValueError(f"unknown stage {stage!r}")


# ---------------------------------------------------------------------------------------------
# The stages: each a call of the library function behind its command
# ---------------------------------------------------------------------------------------------


@dataclass
class StageContext:
    cfg: Config
    run: Path
    device: str
    progress: ProgressFn
    argv: list[str] | None
    resume: bool  # an interrupted attempt with the same fingerprint exists
    stop: StopRequest  # one request for every stage: a signal or run.time_limit stops the stage in progress


def _run_vqgan(ctx: StageContext) -> dict[str, Any]:
    from uvq.vqgan.train import fit_vqgan

    return fit_vqgan(ctx.cfg, ctx.run / "vqgan", device=ctx.device, resume=ctx.resume, overwrite=not ctx.resume,
                     progress=ctx.progress, argv=ctx.argv, stop=ctx.stop)


def _run_latents(ctx: StageContext) -> dict[str, Any]:
    from uvq.checkpoint import load_model
    from uvq.prior.latents import encode_dataset
    from uvq.runtime import resolve_device

    dev = resolve_device(ctx.device)
    ec = ctx.cfg.encode
    model, meta = load_model(ctx.run / "vqgan", "vqgan", weights=ec.weights, device=dev)
    # a fresh encode clears the shards of another fingerprint first (overwrite)
    manifest = encode_dataset(model, meta, ctx.cfg.data, ctx.run / "latents", batch_size=ec.batch_size,
                              shard_size=ec.shard_size, flip_copies=ec.flip_copies, weights=ec.weights, device=dev,
                              overwrite=not ctx.resume, progress=ctx.progress, stop=ctx.stop)
    return {"num_samples": manifest["num_samples"], "latent_shape": manifest["latent_shape"]}


def _run_prior(ctx: StageContext) -> dict[str, Any]:
    from uvq.checkpoint import resolve_checkpoint
    from uvq.prior.train import fit_prior

    return fit_prior(ctx.cfg, ctx.run / "latents", ctx.run / "prior", device=ctx.device, resume=ctx.resume,
                     overwrite=not ctx.resume, vqgan=resolve_checkpoint(ctx.run / "vqgan"), progress=ctx.progress,
                     argv=ctx.argv, stop=ctx.stop)


def _run_samples(ctx: StageContext) -> dict[str, Any]:
    from uvq.checkpoint import resolve_checkpoint
    from uvq.sampling.outputs import write_samples

    sc = ctx.cfg.sample
    return write_samples(ctx.run / "prior", ctx.run / "samples", vqgan=resolve_checkpoint(ctx.run / "vqgan"), n=sc.n,
                         steps=sc.steps, temp=sc.temp, seed=ctx.cfg.run.seed, batch_size=sc.batch_size,
                         sampler=sc.sampler, options=sc.options, grid=sc.grid, device=ctx.device,
                         precision=sc.precision, compile=sc.compile, cuda_graphs=sc.cuda_graphs, overwrite=True,
                         progress=ctx.progress, stop=ctx.stop)


def _run_eval(ctx: StageContext) -> dict[str, Any]:
    try:
        from uvq.evaluation.metrics import SET_METRICS, evaluate_metrics
    except ImportError as exc:
        raise UserError("the eval stage needs uvq.evaluation.metrics.evaluate_metrics, which this uvq lacks; "
                        "set eval.metrics=[] to stop after sampling") from exc
    from uvq.runtime import resolve_device

    metrics = [m for m in ctx.cfg.eval.metrics if m in SET_METRICS]
    skipped = [m for m in ctx.cfg.eval.metrics if m not in SET_METRICS]
    if skipped:
        ctx.progress({"event": "warn", "message": f"the pipeline's eval stage computes set metrics only "
                                                  f"({', '.join(SET_METRICS)}); not run here: {', '.join(skipped)}"})
    out = claim_out_dir(ctx.run / "eval", command="eval", overwrite=True, entries=("report.json",), lock=False).path
    if not metrics:
        report: dict[str, Any] = {"metrics": [], "results": {}}
    else:
        report = evaluate_metrics(metrics, ctx.run / "samples", ctx.cfg.data.source, cfg_eval=ctx.cfg.eval,
                                  device=resolve_device(ctx.device), progress=ctx.progress, seed=ctx.cfg.run.seed)
    atomic_write_json(out / "report.json", report)
    return {"results": report.get("results", {})}


RUNNERS: dict[str, Callable[[StageContext], dict[str, Any]]] = {
    "vqgan": _run_vqgan, "latents": _run_latents, "prior": _run_prior, "samples": _run_samples, "eval": _run_eval,
}


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def _read_state(run: Path) -> dict[str, Any]:
    f = run / STATE_FILE
    if not f.is_file():
        return {"stages": {}}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{f} is corrupt ({exc}); delete it to re-run every stage") from exc


def _open_run(run: Path, cfg: Config) -> OutDir:
    """A new or empty directory, or one of our pipeline runs, locked; anything else is refused."""
    plan = check_out_dir(run, command="pipeline", resume=True, inputs=(cfg.data.source,))
    if plan.action == "resume" and not (run / STATE_FILE).exists():
        raise UserError(f"{run} is not empty and is not a pipeline run; choose another --out")
    return claim_out_dir(run, command="pipeline", resume=True, inputs=(cfg.data.source,),
                         entries=(STATE_FILE, "config.yaml", *STAGES))


def run_pipeline(cfg: Config, out_dir: str | Path, *, device: str = "auto", until: str | None = None,
                 progress: ProgressFn | None = None, argv: list[str] | None = None,
                 stop: StopRequest | None = None) -> dict[str, Any]:
    """Run the stages in order into `out_dir`, skipping complete ones; return a summary.

    `until` stops after that stage (a name of STAGES or its command: fit-vqgan, encode, ...).
    The eval stage runs only when cfg.eval.metrics is non-empty. On a signal or at
    run.time_limit (`stop`, uvq.stopping) the stage in progress saves its state and raises
    uvq.errors.Stopped; its record stays "running", so the next call resumes it.
    """
    progress = progress or null_progress
    stop = from_run_config(stop, cfg.run)  # one deadline for the whole call, from its start
    stages = list(STAGES if cfg.eval.metrics else STAGES[:-1])
    if until is not None:
        by_command = {v: k for k, v in STAGE_COMMANDS.items()}
        last = by_command.get(until, until)
        if last not in stages:
            raise UserError(f"--until {until!r} is not a stage of this run; valid: "
                            f"{', '.join(f'{s} ({STAGE_COMMANDS[s]})' for s in stages)}")
        stages = stages[: stages.index(last) + 1]
    run = Path(out_dir)
    claim = _open_run(run, cfg)
    atomic_write_text(run / "config.yaml", to_yaml(cfg))
    state = _read_state(run)
    summary: dict[str, Any] = {"out_dir": str(run), "stages": {}}
    upstream: str | None = None
    t_all = time.time()
    for stage in stages:
        fp = fingerprint(cfg, stage, upstream)
        record = state["stages"].get(stage, {})
        same = record.get("fingerprint") == fp
        current = output_hash(run, stage)
        if same and record.get("status") == "done" and current is not None and current == record.get("output"):
            progress({"event": "log", "message": f"stage {stage} ({STAGE_COMMANDS[stage]}): complete for this "
                                                 f"config, skipped ({run / stage})"})
            summary["stages"][stage] = {"status": "skipped", "seconds": 0.0}
            upstream = current
            continue
        resume = same and record.get("status") == "running"
        why = ("resuming an interrupted run" if resume else "config changed" if record.get("fingerprint")
               else "first run")
        progress({"event": "log", "message": f"stage {stage} ({STAGE_COMMANDS[stage]}): {why}"})
        state["stages"][stage] = {"fingerprint": fp, "status": "running", "started": time.time()}
        for later in stages[stages.index(stage) + 1:]:
            state["stages"].pop(later, None)  # their inputs are about to change
        atomic_write_json(run / STATE_FILE, state)
        t0 = time.time()
        try:
            result = RUNNERS[stage](StageContext(cfg, run, device, progress, argv, resume, stop))
        except Stopped as exc:  # the stage saved its state; the pipeline's directory is marked too
            exc.out_dirs.append(str(run))
            raise
        seconds = time.time() - t0
        current = output_hash(run, stage)
        if current is None:
            raise UserError(f"stage {stage} finished without a complete output in {run / stage}")
        state["stages"][stage] = {"fingerprint": fp, "status": "done", "output": current, "seconds": round(seconds, 2),
                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_json(run / STATE_FILE, state)
        summary["stages"][stage] = {"status": "resumed" if resume else "ran", "seconds": round(seconds, 2),
                                    "result": _brief(stage, result)}
        upstream = current
    summary["seconds"] = round(time.time() - t_all, 2)
    grid = run / "samples" / "grid.png"
    summary["grid"] = str(grid) if "samples" in stages and grid.is_file() else None
    summary["report"] = str(write_report(run, lock=False))  # the page of every stage (uvq.report), under our lock
    claim.release()
    return summary


def _brief(stage: str, result: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a stage's summary worth repeating in the pipeline's."""
    keys = {"vqgan": ("steps", "images_per_s", "last_checkpoint"), "latents": ("num_samples", "latent_shape"),
            "prior": ("steps", "best", "last_val_bits_per_token"),
            "samples": ("n", "steps", "network_passes_per_image", "timing"), "eval": ("results",)}[stage]
    return {k: result.get(k) for k in keys if k in result}


__all__ = ["STAGES", "run_pipeline", "fingerprint", "stage_inputs", "output_hash"]
