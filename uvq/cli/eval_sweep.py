"""`uvq eval sweep`: FID / PRDC over steps x temperatures (paper Table 3). A thin wrapper over uvq.evaluation.sweep.

The `sweep`, `sample` and `eval` sections are the prior's own recipe's (embedded in its
checkpoint), with `section.key=value` overrides; the flags are shortcuts onto the same fields.
"""

from __future__ import annotations

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
    eval_app,
    reporter,
)

_SECTIONS = ("sweep", "sample", "eval")


def _number_list(text: str | None, flag: str, kind: type) -> list | None:
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()] or None
    except ValueError:
        from uvq.errors import UserError

        raise UserError(f"{flag} takes comma-separated {'integers' if kind is int else 'numbers'} "
                        f"(e.g. {'50,100,256' if kind is int else '0.8,0.9'}), not {text!r}") from None


def sweep_sections(meta: dict[str, Any], overrides: list[str], shortcuts: dict[str, Any]):
    """(sweep, sample, eval) sections for a prior checkpoint's `meta`: its recipe's sections, then
    the flags (`shortcuts`: "section.key" -> value), then the `section.key=value` overrides."""
    from uvq.cli.sample import generation_section
    from uvq.config import ConfigError, EvalConfig, SweepConfig, apply_overrides, section_from_dict

    by_section: dict[str, list[str]] = {s: [] for s in _SECTIONS}
    for item in overrides:
        section = item.split("=", 1)[0].strip().split(".", 1)[0]
        if section not in by_section or "=" not in item:
            raise ConfigError(f"override {item!r}: this command takes sweep.KEY=VALUE, sample.KEY=VALUE or "
                              "eval.KEY=VALUE overrides (the model comes from the checkpoint); e.g. sweep.steps=[50,100]")
        by_section[section].append(item)
    short = {s: {k.split(".", 1)[1]: v for k, v in shortcuts.items() if k.startswith(f"{s}.") and v is not None}
             for s in _SECTIONS}
    sample = generation_section("sample", meta, by_section["sample"], short["sample"])
    out = {}
    for name, cls in (("sweep", SweepConfig), ("eval", EvalConfig)):
        data = {name: {**dict((meta.get("config") or {}).get(name) or {}), **short[name]}}
        data = apply_overrides(data, by_section[name])
        out[name] = section_from_dict(cls, data[name], name)
    return out["sweep"], sample, out["eval"]


def register(app: typer.Typer) -> None:
    @eval_app.command("sweep")
    def sweep_cmd(
        overrides: list[str] = typer.Argument(None, help="sweep.key=value, sample.key=value or eval.key=value "
                                              "overrides, e.g. sweep.temps=[0.8,1.0] sample.sampler=halton.v1."),
        reference: str = typer.Option(None, "--reference", help="sweep.reference: the reference set (training "
                                      "images), as for `uvq eval fid`."),
        steps: str = typer.Option(None, "--steps", help="sweep.steps: comma-separated step budgets "
                                  "(default: Table 3's 50,100,150,200,256 scaled to N)."),
        temps: str = typer.Option(None, "--temps", help="sweep.temps: comma-separated temperatures (default: sample.temp)."),
        n: int = typer.Option(None, "-n", "--count", help="sweep.n: samples per cell."),
        prior: str = PriorOpt,
        run: Path = PriorRunOpt,
        recipe: str = PriorRecipeOpt,
        vqgan: str = VqganOpt,
        out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: sweeps/<run name>); "
                                 "a rerun continues it, skipping finished cells."),
        inception_weights: Path = typer.Option(None, "--inception-weights", help="eval.inception_weights: "
                                               "torch-fidelity's weights-inception-2015-12-05-6726825d.pth."),
        cache_dir: Path = typer.Option(None, "--cache-dir", help="Feature cache (default: $UVQ_CACHE/features "
                                       "or ~/.cache/uvq/features)."),
        seed: int = typer.Option(0, "--seed", help="Seed; every cell samples with it (sample i depends on (seed, i))."),
        weights: str = typer.Option("default", "--weights", help="Prior weights: default, ema or model."),
        device: str = DeviceOpt,
        overwrite: bool = OverwriteOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """FID and PRDC over a grid of sampling steps x temperatures (Table 3), each cell cached."""
        from uvq.cli.sample import describe, find_generation_prior, run_name
        from uvq.evaluation.sweep import run_sweep

        apply_local(json_flag, debug)
        rep = reporter()
        ckpt, meta = find_generation_prior(prior=prior, run=run, recipe=recipe, weights=weights, rep=rep)
        sweep, sample, cfg_eval = sweep_sections(meta, list(overrides or []), {
            "sweep.reference": reference, "sweep.steps": _number_list(steps, "--steps", int),
            "sweep.temps": _number_list(temps, "--temps", float), "sweep.n": n,
            "eval.inception_weights": str(inception_weights) if inception_weights else None})
        for name, cfg in (("sweep", sweep), ("sample", sample), ("eval", cfg_eval)):
            rep({"event": "log", "message": describe(name, cfg)})
        if out is None:
            out = Path("sweeps") / run_name(ckpt)
        try:
            summary = run_sweep(ckpt, out, sweep=sweep, sample=sample, cfg_eval=cfg_eval, vqgan=vqgan, seed=seed,
                                weights=weights, device=device, cache_dir=cache_dir, overwrite=overwrite,
                                command=" ".join(STATE.argv), progress=rep)
        finally:
            rep.close()
        table = (Path(summary["out_dir"]) / "sweep.md").read_text()
        emit(summary, human=f"{table}\n{summary['cells_run']} cell(s) run, {summary['cells_reused']} reused; "
                            f"wrote sweep.csv, sweep.md and sweep.png to {summary['out_dir']}")
