"""`uvq sample`: images from a trained prior. A thin wrapper over uvq.sampling.outputs.write_samples."""

from __future__ import annotations

from pathlib import Path

import typer

from uvq.cli.common import (
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    PriorOpt,
    PriorRecipeOpt,
    PriorRunOpt,
    VqganOpt,
    apply_local,
    emit,
    reporter,
)


def register(app: typer.Typer) -> None:
    @app.command("sample")
    def sample_cmd(
        prior: str = PriorOpt,
        run: Path = PriorRunOpt,
        recipe: str = PriorRecipeOpt,
        vqgan: str = VqganOpt,
        n: int = typer.Option(None, "--n", help="Number of samples (default: the recipe's sample.n)."),
        steps: int = typer.Option(None, "--steps", help="Sampling steps S, 1..N (default: the recipe's sample.steps, else N)."),
        temp: float = typer.Option(None, "--temp", help="Temperature of softmax(logits / temp) (default: sample.temp)."),
        out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: samples/<run name>)."),
        batch_size: int = typer.Option(None, "--batch-size", help="Samples per batch (default: sample.batch_size)."),
        sampler: str = typer.Option(None, "--sampler", help="Registered sampler (default: absorbing.v1, the paper's)."),
        top_k: int = typer.Option(None, "--top-k", help="Draw values from the k most likely codes only."),
        top_p: float = typer.Option(None, "--top-p", help="Draw values from the nucleus of mass p only."),
        seed: int = typer.Option(0, "--seed", help="Seed; sample i depends only on (seed, i), not on the batch size."),
        grid: bool = typer.Option(None, "--grid/--no-grid", help="Also write grid.png (default: sample.grid)."),
        codes: bool = typer.Option(False, "--codes", help="Also write the token grids as latent shards (codes/)."),
        weights: str = typer.Option("default", "--weights", help="Prior weights: default, ema or model."),
        precision: str = typer.Option(None, "--precision", help="bf16, fp16 or fp32 on CUDA (the CPU runs fp32)."),
        compile_: bool = typer.Option(False, "--compile", help="torch.compile the prior (pays a compile time)."),
        cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="CUDA graphs via torch.compile reduce-overhead."),
        device: str = DeviceOpt,
        overwrite: bool = OverwriteOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Sample images with the paper's sampler (random order, 1/t reveals, exact reuse of passes)."""
        from uvq.checkpoint import find_prior, find_vqgan, read_meta
        from uvq.config import SampleConfig, section_from_dict
        from uvq.runtime import UserError
        from uvq.sampling.chain import sampler_options
        from uvq.sampling.outputs import write_samples

        apply_local(json_flag, debug)
        if precision is not None and precision not in ("bf16", "fp16", "fp32"):
            raise UserError(f"--precision must be bf16, fp16 or fp32, not {precision!r}")
        if weights not in ("default", "ema", "model"):
            raise UserError(f"--weights must be default, ema or model, not {weights!r}")
        rep = reporter()
        ckpt, where = find_prior(prior, run=run, recipe=recipe)
        meta = read_meta(ckpt)
        rep({"event": "log", "message": f"prior: {ckpt} (from {where})"})
        # The prior's own recipe supplies what the command line leaves out (its sample section).
        recipe_sample = (meta.get("config") or {}).get("sample") or {}
        cfg = section_from_dict(SampleConfig, recipe_sample, "sample") if recipe_sample else SampleConfig()
        vq_path, _, vq_where = find_vqgan(meta, vqgan)
        rep({"event": "log", "message": f"vqgan: {vq_path} (from {vq_where})"})
        if out is None:
            run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
            run_name = run_dir.parent.name if run_dir.name == "prior" else run_dir.name
            out = Path("samples") / run_name
        try:
            summary = write_samples(
                ckpt, out, vqgan=vq_path, n=n if n is not None else cfg.n, steps=steps if steps is not None else cfg.steps,
                temp=temp if temp is not None else cfg.temp, seed=seed,
                batch_size=batch_size if batch_size is not None else cfg.batch_size,
                sampler=sampler or cfg.sampler,
                options=sampler_options(top_k=top_k if top_k is not None else cfg.top_k,
                                        top_p=top_p if top_p is not None else cfg.top_p),
                grid=cfg.grid if grid is None else grid, codes=codes, weights=weights, device=device,
                precision=precision or cfg.precision, compile=compile_, cuda_graphs=cuda_graphs,
                overwrite=overwrite, progress=rep)
        finally:
            rep.close()
        timing = summary["timing"]
        human = (f"wrote {summary['n']} samples to {summary['out_dir']} ({timing['images_per_s']:.1f} images/s, "
                 f"{summary['network_passes_per_image']:.1f} network passes per image over {summary['steps']} steps)")
        if summary["grid"]:
            human += f"\ngrid: {summary['grid']}"
        emit(summary, human=human)
