"""Sample outputs: the library function behind `uvq sample` (and the pipeline's sample stage).

Writes stable names (sample i is the i-th draw of the seed), a grid, optional token shards, and
`samples.json`, whose provenance head (`provenance_header`) the canvas and inpainting records share.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from uvq import __version__
from uvq.checkpoint import load_pair, read_prior_meta, resolve_pair, verify_checkpoint
from uvq.errors import Stopped
from uvq.progress import ProgressFn, null_progress
from uvq.runtime import UserError
from uvq.sampling.chain import DEFAULT_SAMPLER, _validate_sampling, bind_sampler, iter_samples
from uvq.stopping import StopRequest

SAMPLE_NAME = "sample-{:06d}.png"
SAMPLES_JSON = "samples.json"
GRID_COLUMNS = 8  # the sample grid: up to 64 samples, 8 per row, each row labelled with its first sample index



def provenance_header(command: str, out: Path, n: int, prior_meta: dict[str, Any], weights: str,
                      vq_meta: dict[str, Any] | None, vq_weights: str | None) -> dict[str, Any]:
    """The common head of samples.json / canvas / inpaint records: version, time, checkpoints and hashes."""
    return {
        "uvq_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "out_dir": str(out),
        "n": n,
        "prior": {"path": prior_meta["path"], "sha256": prior_meta["weights_sha256"], "step": prior_meta.get("step"),
                  "weights": prior_meta["default_weights"] if weights == "default" else weights},
        "vqgan": None if vq_meta is None else {"path": vq_meta["path"], "sha256": vq_meta["weights_sha256"],
                                               "step": vq_meta.get("step"), "weights": vq_weights},
    }

def claim_shared(out_dir: str | Path, **claim_args: Any):
    """Claim `out_dir` for a job the ranks share: (its path, the claim on rank 0 / None elsewhere).

    Rank 0 claims the directory (uvq.files.claim_out_dir: the one output-directory rule, the lock)
    and tells the others its path, or its refusal, which every rank then raises. Each rank then
    checks that it sees the claimed directory: under torchrun on several nodes `--out` must be on a
    filesystem that every rank shares, because each rank writes its own samples' files there.
    """
    from uvq.files import MARKER, claim_out_dir
    from uvq.runtime import all_ranks_ok, on_main

    claim = None

    def take() -> str:
        nonlocal claim
        claim = claim_out_dir(out_dir, **claim_args)
        return str(claim.path)

    out = Path(on_main(take))
    if not all_ranks_ok((out / MARKER).is_file()):
        if claim is not None:
            claim.release()
        raise UserError(f"--out {out} is not visible on every rank; under torchrun the output directory must be "
                        "on a filesystem that all ranks share")
    return out, claim


def write_samples(prior: str | Path, out_dir: str | Path, *, vqgan: str | Path | None = None, n: int = 64,
                  steps: int | None = None, temp: float = 0.9, seed: int = 0, batch_size: int = 64,
                  sampler: str = DEFAULT_SAMPLER, options: dict[str, Any] | None = None, grid: bool = True,
                  codes: bool = False, images: bool = True, weights: str = "default", device: str = "auto",
                  precision: str = "bf16", compile: bool = False, cuda_graphs: bool = False,
                  overwrite: bool = False, allow_other_vqgan: bool = False, progress: ProgressFn | None = None,
                  stop: StopRequest | None = None) -> dict[str, Any]:
    """Sample n images from a prior checkpoint into `out_dir`; return the summary (samples.json).

    Writes sample-000000.png ... (stable names: sample i is the i-th of the seed), grid.png (the
    first 64, when `grid`), codes/ (the token grids as latent shards with a manifest naming the
    VQGAN, when `codes`) and samples.json (checkpoint hashes, settings, timing, network passes).
    `images=False` writes codes only and needs no VQGAN. On a signal (`stop`, uvq.stopping) the
    batch in progress is written, then uvq.errors.Stopped is raised: the PNGs written are complete
    (atomic), samples.json is not written, and a re-run with `overwrite` writes the same bytes.
    """
    from uvq.files import atomic_write_json
    from uvq.images import save_grid, save_png
    from uvq.runtime import (
        JobProgress,
        batch_share,
        gather_to_main,
        init_distributed,
        on_main,
        reduce_numbers,
        resolve_device,
        share_rounds,
    )

    if not images and not codes:
        raise UserError("nothing to write: ask for images, --codes, or both")
    t_start = time.perf_counter()
    dev = resolve_device(device)
    info = init_distributed(dev)
    progress = (progress or null_progress) if info.is_main else null_progress
    prior_meta = read_prior_meta(prior)
    n_tokens = int(prior_meta["model_config"]["latent_shape"][0]) * int(prior_meta["model_config"]["latent_shape"][1])
    steps = n_tokens if steps is None else int(steps)
    _validate_sampling(n_tokens, steps, temp)
    if batch_size < 1 or n < 1:
        raise UserError("-n and --batch-size must be >= 1")
    bind_sampler(sampler, options)  # an unknown sampler or option fails before anything is written
    if prior_meta["model_config"].get("causal"):  # the autoregressive baseline samples token by token
        from uvq.config import check_autoregressive_sampling

        check_autoregressive_sampling(n_tokens, steps, sampler, options)
    vq_model = vq_meta = vq_weights = None
    if images or vqgan is not None:
        vq_meta, vq_weights = resolve_pair(prior_meta, vqgan, allow_other_vqgan=allow_other_vqgan, progress=progress)
    # Damaged weights are refused before the output directory is touched (a refused command changes nothing).
    verify_checkpoint(prior_meta["path"], "prior")
    if vq_meta is not None:
        verify_checkpoint(vq_meta["path"], "vqgan")
    out, claim = claim_shared(out_dir, command="sample", overwrite=overwrite,
                              inputs=(prior, prior_meta["path"], vqgan, vq_meta and vq_meta["path"]),
                              entries=("grid.png", "codes", SAMPLES_JSON),
                              patterns=(SAMPLE_NAME.replace("{:06d}", "*"),))
    net, prior_meta, vq_model, vq_meta, vq_weights = load_pair(prior, vqgan, weights=weights, device=dev, allow_other_vqgan=allow_other_vqgan,
                                                               decoder=vq_meta is not None)
    latent_shape = tuple(int(s) for s in prior_meta["model_config"]["latent_shape"])

    # This rank's share: whole batches of the one-process run (uvq.runtime.batch_share). Each rank
    # writes its own sample files; the grid's images and the codes go to rank 0, which writes them.
    first, count = batch_share(n, batch_size, info)
    stop = stop if stop is not None else StopRequest()
    stop.watch()
    job = JobProgress(progress, "sample", n, share_rounds(n, batch_size, info.world_size), stop=stop)
    stats: dict[str, Any] = {"network_passes": 0, "tokens_s": 0.0, "decode_s": 0.0}
    grid_images: list[torch.Tensor] = []
    all_codes: list[tuple[str, Any]] = []
    write_s = 0.0
    done = passes_here = 0
    batches = iter_samples(net, count, vqgan=vq_model if images else None, steps=steps, temp=temp, seed=seed,
                           batch_size=batch_size, sampler=sampler, options=options, device=dev,
                           precision=precision, compile=compile, cuda_graphs=cuda_graphs, start_index=first,
                           latent_shape=latent_shape, progress=job.inner, stats=stats) if count else ()
    for batch in batches:
        t0 = time.perf_counter()
        grids = batch.tokens.view(-1, *latent_shape)  # [b, h, w]
        for j in range(grids.shape[0]):
            i = batch.start + j
            if images:
                save_png(batch.images[j].clamp(0, 1), out / SAMPLE_NAME.format(i))
            if codes:
                all_codes.append((f"sample-{i:06d}", grids[j].numpy().astype("uint16")))
        if images and grid and batch.start < 64:
            grid_images.extend(batch.images[: 64 - batch.start])
        write_s += time.perf_counter() - t0
        done, passes_here = done + grids.shape[0], passes_here + batch.network_passes
        reason = job.advance(grids.shape[0], {"passes/img": round(passes_here / done, 1)})
        if reason is not None:
            break
    else:
        reason = job.finish()
    if reason is not None:  # every rank agreed on this round (JobProgress): the written PNGs are complete
        if claim is not None:
            claim.release()
        raise Stopped(reason, f"the samples of the finished batches are written in {out}; "
                              "--overwrite writes the same bytes again", out=out)
    passes, = reduce_numbers([stats["network_passes"]], "sum")
    tokens_s, decode_s, write_s = reduce_numbers([stats["tokens_s"], stats["decode_s"], write_s], "max")
    gathered = gather_to_main((grid_images, all_codes))

    def write_shared() -> dict[str, Any]:
        """Rank 0, after every rank's samples: the grid, the codes and samples.json."""
        grid_all = [im for part, _ in gathered for im in part]
        codes_all = [item for _, part in gathered for item in part]
        grid_path = codes_dir = None
        if grid_all:
            grid_path = save_grid(torch.stack(grid_all).clamp(0, 1), out / "grid.png", nrow=GRID_COLUMNS,
                                  row_labels=[f"#{i}" for i in range(0, len(grid_all), GRID_COLUMNS)])
        if codes:
            from uvq.prior.latents import tokenizer_record, write_latents

            codes_dir = out / "codes"
            tokenizer = tokenizer_record(vq_meta, vq_weights) if vq_meta is not None else (
                (prior_meta.get("provenance") or {}).get("tokenizer"))
            write_latents(codes_dir, {"train": codes_all}, codebook_size=int(prior_meta["model_config"]["codebook_size"]),
                          tokenizer=tokenizer, transform={"generated_by": "uvq sample", "seed": seed})
        total_s = time.perf_counter() - t_start
        summary = {
            **provenance_header("sample", out, n, prior_meta, weights, vq_meta, vq_weights),
            "seed": seed,
            "steps": steps,
            "temperature": temp,
            # An autoregressive prior ignores the (default) absorbing sampler: record what ran.
            "sampler": "autoregressive, raster order, KV cache" if prior_meta["model_config"].get("causal") else sampler,
            "sampler_options": dict(options or {}),
            "batch_size": batch_size,
            "device": str(dev),
            "world_size": info.world_size,
            "precision": precision if dev.type == "cuda" else "fp32",
            "compile": compile,
            "cuda_graphs": cuda_graphs,
            "network_passes": int(passes),
            "network_passes_per_image": passes / n,
            "timing": {"tokens_s": round(tokens_s, 3), "decode_s": round(decode_s, 3),
                       "write_s": round(write_s, 3), "total_s": round(total_s, 3),
                       "tokens_images_per_s": round(n / max(tokens_s, 1e-9), 3),
                       "images_per_s": round(n / max(tokens_s + decode_s, 1e-9), 3)},
            "files": {"images": SAMPLE_NAME.replace("{:06d}", "%06d") if images else None,
                      "grid": grid_path.name if grid_path else None, "codes": codes_dir.name if codes_dir else None},
            "grid": str(grid_path) if grid_path else None,
        }
        atomic_write_json(out / SAMPLES_JSON, summary)
        claim.release()
        return summary

    return on_main(write_shared)
