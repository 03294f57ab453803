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
from uvq.progress import ProgressFn, null_progress
from uvq.runtime import UserError
from uvq.sampling.chain import DEFAULT_SAMPLER, _validate_sampling, bind_sampler, iter_samples

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

def write_samples(prior: str | Path, out_dir: str | Path, *, vqgan: str | Path | None = None, n: int = 64,
                  steps: int | None = None, temp: float = 0.9, seed: int = 0, batch_size: int = 64,
                  sampler: str = DEFAULT_SAMPLER, options: dict[str, Any] | None = None, grid: bool = True,
                  codes: bool = False, images: bool = True, weights: str = "default", device: str = "auto",
                  precision: str = "bf16", compile: bool = False, cuda_graphs: bool = False,
                  overwrite: bool = False, allow_other_vqgan: bool = False, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Sample n images from a prior checkpoint into `out_dir`; return the summary (samples.json).

    Writes sample-000000.png ... (stable names: sample i is the i-th of the seed), grid.png (the
    first 64, when `grid`), codes/ (the token grids as latent shards with a manifest naming the
    VQGAN, when `codes`) and samples.json (checkpoint hashes, settings, timing, network passes).
    `images=False` writes codes only and needs no VQGAN.
    """
    from uvq.files import atomic_write_json, claim_out_dir
    from uvq.images import save_grid, save_png
    from uvq.runtime import resolve_device

    progress = progress or null_progress
    if not images and not codes:
        raise UserError("nothing to write: ask for images, --codes, or both")
    t_start = time.perf_counter()
    dev = resolve_device(device)
    prior_meta = read_prior_meta(prior)
    n_tokens = int(prior_meta["model_config"]["latent_shape"][0]) * int(prior_meta["model_config"]["latent_shape"][1])
    steps = n_tokens if steps is None else int(steps)
    _validate_sampling(n_tokens, steps, temp)
    bind_sampler(sampler, options)  # an unknown sampler or option fails before anything is written
    vq_model = vq_meta = vq_weights = None
    if images or vqgan is not None:
        vq_meta, vq_weights = resolve_pair(prior_meta, vqgan, allow_other_vqgan=allow_other_vqgan, progress=progress)
    # Damaged weights are refused before the output directory is touched (a refused command changes nothing).
    verify_checkpoint(prior_meta["path"], "prior")
    if vq_meta is not None:
        verify_checkpoint(vq_meta["path"], "vqgan")
    claim = claim_out_dir(out_dir, command="sample", overwrite=overwrite,
                          inputs=(prior, prior_meta["path"], vqgan, vq_meta and vq_meta["path"]),
                          entries=("grid.png", "codes", SAMPLES_JSON), patterns=(SAMPLE_NAME.replace("{:06d}", "*"),))
    out = claim.path
    net, prior_meta, vq_model, vq_meta, vq_weights = load_pair(prior, vqgan, weights=weights, device=dev, allow_other_vqgan=allow_other_vqgan,
                                                               decoder=vq_meta is not None)
    latent_shape = tuple(int(s) for s in prior_meta["model_config"]["latent_shape"])

    stats: dict[str, Any] = {}
    grid_images: list[torch.Tensor] = []
    all_codes: list[tuple[str, Any]] = []
    write_s = 0.0
    for batch in iter_samples(net, n, vqgan=vq_model if images else None, steps=steps, temp=temp, seed=seed,
                              batch_size=batch_size, sampler=sampler, options=options, device=dev,
                              precision=precision, compile=compile, cuda_graphs=cuda_graphs,
                              latent_shape=latent_shape, progress=progress, stats=stats):
        t0 = time.perf_counter()
        grids = batch.tokens.view(-1, *latent_shape)  # [b, h, w]
        for j in range(grids.shape[0]):
            i = batch.start + j
            if images:
                save_png(batch.images[j].clamp(0, 1), out / SAMPLE_NAME.format(i))
            if codes:
                all_codes.append((f"sample-{i:06d}", grids[j].numpy().astype("uint16")))
        if images and grid and len(grid_images) < 64:
            grid_images.extend(batch.images[: 64 - len(grid_images)])
        write_s += time.perf_counter() - t0

    grid_path = codes_dir = None
    if grid_images:
        grid_path = save_grid(torch.stack(grid_images).clamp(0, 1), out / "grid.png", nrow=GRID_COLUMNS,
                              row_labels=[f"#{i}" for i in range(0, len(grid_images), GRID_COLUMNS)])
    if codes:
        from uvq.prior.latents import tokenizer_record, write_latents

        codes_dir = out / "codes"
        tokenizer = tokenizer_record(vq_meta, vq_weights) if vq_meta is not None else (
            (prior_meta.get("provenance") or {}).get("tokenizer"))
        write_latents(codes_dir, {"train": all_codes}, codebook_size=int(prior_meta["model_config"]["codebook_size"]),
                      tokenizer=tokenizer, transform={"generated_by": "uvq sample", "seed": seed})
    total_s = time.perf_counter() - t_start
    summary = {
        **provenance_header("sample", out, n, prior_meta, weights, vq_meta, vq_weights),
        "seed": seed,
        "steps": steps,
        "temperature": temp,
        "sampler": sampler,
        "sampler_options": dict(options or {}),
        "batch_size": batch_size,
        "device": str(dev),
        "precision": precision if dev.type == "cuda" else "fp32",
        "compile": compile,
        "cuda_graphs": cuda_graphs,
        "network_passes": stats["network_passes"],
        "network_passes_per_image": stats["network_passes"] / n,
        "timing": {"tokens_s": round(stats["tokens_s"], 3), "decode_s": round(stats["decode_s"], 3),
                   "write_s": round(write_s, 3), "total_s": round(total_s, 3),
                   "tokens_images_per_s": round(n / max(stats["tokens_s"], 1e-9), 3),
                   "images_per_s": round(n / max(stats["tokens_s"] + stats["decode_s"], 1e-9), 3)},
        "files": {"images": SAMPLE_NAME.replace("{:06d}", "%06d") if images else None,
                  "grid": grid_path.name if grid_path else None, "codes": codes_dir.name if codes_dir else None},
        "grid": str(grid_path) if grid_path else None,
    }
    atomic_write_json(out / SAMPLES_JSON, summary)
    claim.release()
    return summary
