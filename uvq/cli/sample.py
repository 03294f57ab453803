"""`uvq sample`: images from a trained prior. A thin wrapper over uvq.sampling.outputs.write_samples.

The settings are the `sample` section of the prior's own recipe (embedded in its checkpoint), with
`sample.key=value` overrides; the flags are shortcuts onto the same fields. `generation_section`
does that for `upscale-canvas` (`canvas`) and `inpaint` (`inpaint`) too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

from uvq.cli.common import (
    STATE,
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

# Options that the sample section of recipes older than `sample.options` held at its top level.
_MOVED_TO_OPTIONS = ("top_k", "top_p")


def generation_section(section: str, meta: dict[str, Any], overrides: list[str], shortcuts: dict[str, Any]):
    """The `section` (sample, canvas or inpaint) for a prior checkpoint's `meta`: its recipe's section,
    then the flags given (`shortcuts`: field -> value; "options.KEY" sets a sampler option), then the
    `section.key=value` overrides; validated, with its sampler's options bound (one UserError)."""
    from uvq.config import (
        CanvasConfig,
        ConfigError,
        InpaintConfig,
        SampleConfig,
        apply_overrides,
        section_from_dict,
    )
    from uvq.sampling.chain import bind_sampler

    cls = {"sample": SampleConfig, "canvas": CanvasConfig, "inpaint": InpaintConfig}[section]
    embedded = dict((meta.get("config") or {}).get(section) or {})
    options = dict(embedded.pop("options", None) or {})
    for key in _MOVED_TO_OPTIONS if section == "sample" else ():
        value = embedded.pop(key, None)
        if value is not None:
            options.setdefault(key, value)
    for key, value in shortcuts.items():
        if value is None:
            continue
        if key.startswith("options."):
            options[key.split(".", 1)[1]] = value
        else:
            embedded[key] = value
    data = {section: {**embedded, "options": options}}
    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith(f"{section}."):
            raise ConfigError(f"override {item!r}: this command takes {section}.KEY=VALUE overrides "
                              f"(the model comes from the checkpoint); for example {section}.temp=0.8")
    data = apply_overrides(data, overrides)
    cfg = section_from_dict(cls, data[section], section)
    bind_sampler(cfg.sampler, cfg.options, section)
    return cfg


def generation_setup(section: str, *, prior, run, recipe, overrides, shortcuts: dict[str, Any], weights: str,
                     rep) -> tuple[Path, dict[str, Any], Any]:
    """The prelude of `sample`, `upscale-canvas` and `inpaint`: check `--weights`, find the prior
    checkpoint, resolve the command's section (`generation_section`) and log where the prior came
    from. Returns (checkpoint, its meta, the section)."""
    ckpt, meta = find_generation_prior(prior=prior, run=run, recipe=recipe, weights=weights, rep=rep)
    if section in ("canvas", "inpaint"):  # an AR prior cannot fill regions with known tokens after them
        from uvq.prior.autoregressive import refuse_autoregressive

        refuse_autoregressive({"canvas": "upscale-canvas", "inpaint": "inpaint"}[section], meta=meta)
    cfg = generation_section(section, meta, list(overrides or []), shortcuts)
    return ckpt, meta, cfg


def find_generation_prior(*, prior, run, recipe, weights: str, rep) -> tuple[Path, dict[str, Any]]:
    """Check `--weights`, find the prior checkpoint (`--prior`, `--run-dir` or `--recipe`) and log
    where it came from: (checkpoint, its meta). Shared by the generation commands and `eval sweep`."""
    from uvq.checkpoint import find_prior, read_meta
    from uvq.errors import UserError

    if weights not in ("default", "ema", "model"):
        raise UserError(f"--weights must be default, ema or model, not {weights!r}")
    ckpt, where = find_prior(prior, run=run, recipe=recipe)
    rep({"event": "log", "message": f"prior: {ckpt} (from {where})"})
    return ckpt, read_meta(ckpt)


def run_name(ckpt: Path) -> str:
    """The name of the run a prior checkpoint belongs to (a pipeline run's name for its prior/
    stage): the default output folder's name of `sample` and `eval sweep`."""
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    return run_dir.parent.name if run_dir.name == "prior" else run_dir.name


class _Quiet:
    """The progress sink of ranks other than 0 under torchrun: rank 0 reports the whole job."""

    warnings: tuple = ()

    def __call__(self, event: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def rank_reporter():
    """`reporter()` on rank 0 (or without torchrun), a quiet sink on the other ranks.

    torchrun's RANK is read from the environment because the process group is joined later,
    inside the library call."""
    import os

    return reporter() if os.environ.get("RANK", "0") == "0" else _Quiet()


def on_rank0() -> bool:
    """Whether this process prints the command's result (rank 0, or no torchrun)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def describe(section: str, cfg: Any) -> str:
    """One log line with the resolved section (what the command will run with)."""
    return f"{section}: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())


def register(app: typer.Typer) -> None:
    @app.command("sample")
    def sample_cmd(
        overrides: list[str] = typer.Argument(None, help="sample.key=value overrides, e.g. sample.options.top_k=50."),
        prior: str = PriorOpt,
        run: Path = PriorRunOpt,
        recipe: str = PriorRecipeOpt,
        vqgan: str = VqganOpt,
        n: int = typer.Option(None, "-n", "--count", help="sample.n: number of samples."),
        steps: int = typer.Option(None, "--steps", help="sample.steps: sampling steps S, 1..N (unset: N)."),
        temp: float = typer.Option(None, "--temp", help="sample.temp: temperature of softmax(logits / temp)."),
        batch_size: int = typer.Option(None, "--batch-size", help="sample.batch_size: samples per batch."),
        sampler: str = typer.Option(None, "--sampler", help="sample.sampler: a registered sampler (`uvq ls samplers`)."),
        top_k: int = typer.Option(None, "--top-k", help="sample.options.top_k: values from the k most likely codes."),
        top_p: float = typer.Option(None, "--top-p", help="sample.options.top_p: values from the nucleus of mass p."),
        out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: samples/<run name>)."),
        seed: int = typer.Option(0, "--seed", help="Seed; sample i depends only on (seed, i), not on the batch size."),
        codes: bool = typer.Option(False, "--codes", metavar="", help="Also write the token grids as latent shards (codes/)."),
        weights: str = typer.Option("default", "--weights", help="Prior weights: default, ema or model."),
        device: str = DeviceOpt,
        overwrite: bool = OverwriteOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Sample images with the paper's sampler (random order, 1/t reveals, exact reuse of passes)."""
        from uvq.checkpoint import find_vqgan
        from uvq.runtime import barrier, shutdown_distributed
        from uvq.sampling.outputs import write_samples

        apply_local(json_flag, debug)
        rep = rank_reporter()
        ckpt, meta, cfg = generation_setup("sample", prior=prior, run=run, recipe=recipe, overrides=overrides, shortcuts={
            "n": n, "steps": steps, "temp": temp, "batch_size": batch_size, "sampler": sampler,
            "options.top_k": top_k, "options.top_p": top_p}, weights=weights, rep=rep)
        vq_path, _, vq_where = find_vqgan(meta, vqgan, allow_other_vqgan=cfg.allow_other_vqgan, progress=rep)
        rep({"event": "log", "message": f"vqgan: {vq_path} (from {vq_where})"})
        rep({"event": "log", "message": describe("sample", cfg)})
        if (meta.get("model_config") or {}).get("causal"):
            rep({"event": "log", "message": "an autoregressive prior: sampled token by token in raster order with a "
                                            "KV cache (sample.sampler does not apply)"})
        if out is None:
            out = Path("samples") / run_name(ckpt)
        try:
            summary = write_samples(ckpt, out, vqgan=vq_path, seed=seed, codes=codes, weights=weights, device=device,
                                    overwrite=overwrite, progress=rep, stop=STATE.stop, **dataclasses.asdict(cfg))
            barrier()  # every rank is done with its collectives before any leaves the group
        finally:
            rep.close()
            shutdown_distributed()
        if not on_rank0():
            return
        timing = summary["timing"]
        human = (f"wrote {summary['n']} samples to {summary['out_dir']} ({timing['images_per_s']:.1f} images/s, "
                 f"{summary['network_passes_per_image']:.1f} network passes per image over {summary['steps']} steps)")
        if summary["grid"]:
            human += f"\ngrid: {summary['grid']}"
        emit(summary, human=human)
