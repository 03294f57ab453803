"""Step and temperature sweeps (paper Table 3, section 4.2.1): FID / PRDC over a grid of cells.

Table 3 reports FID against the number of sampling steps (50..256, evenly skipped). A sweep
samples every cell of a grid of step budgets x temperatures with one sampler and seed, scores
each cell against one reference set with the existing metrics (uvq.evaluation.metrics, the
features cached by content in uvq.evaluation.features), and writes a CSV, a Markdown table in
Table 3's shape and a PNG plot.

Each cell is its own `uvq sample` directory (cells/<cell>/) and its own result file
(cells/<cell>.json), written atomically after its metrics and keyed by everything that decides
its numbers (prior and VQGAN weights, sampler and options, n, seed, steps, temperature, the
reference's content, the extractor's weights, the metric settings). A rerun takes every cell
whose result file carries the same key and redoes the rest: a killed sweep resumes, and a cell
that was half done when it was killed is sampled again from scratch.

The module reads top to bottom: the grid and its cells, the sweep, then the tables and plot.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from uvq import __version__
from uvq.config import TABLE3_STEPS, EvalConfig, SampleConfig, SweepConfig
from uvq.files import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    check_out_dir,
    claim_out_dir,
)
from uvq.progress import ProgressFn, null_progress
from uvq.runtime import UserError

COMMAND = "eval sweep"
CELLS = "cells"
OUTPUTS = ("sweep.csv", "sweep.md", "sweep.png", "sweep.json")
# The columns of sweep.csv that come from the metrics, in the order the metrics give them.
METRIC_COLUMNS = {"fid": ("fid",), "kid": ("kid", "kid_std"), "prdc": ("precision", "recall", "density", "coverage")}

# ---------------------------------------------------------------------------------------------
# The grid and its cells
# ---------------------------------------------------------------------------------------------


def default_steps(n_tokens: int) -> list[int]:
    """Table 3's step budgets 50, 100, 150, 200, 256 scaled to N tokens (exactly them at N = 256)."""
    return sorted({max(1, round(s * n_tokens / 256)) for s in TABLE3_STEPS})


@dataclass(frozen=True)
class Cell:
    steps: int
    temp: float

    @property
    def name(self) -> str:
        return f"steps{self.steps:05d}-temp{self.temp:g}"


def sweep_grid(sweep: SweepConfig, sample: SampleConfig, n_tokens: int) -> list[Cell]:
    """The cells, temperatures outer and steps inner (the order of the table's rows and columns)."""
    steps = list(sweep.steps) if sweep.steps is not None else default_steps(n_tokens)
    bad = [s for s in steps if not 1 <= s <= n_tokens]
    if bad:
        raise UserError(f"sweep.steps {bad} lie outside 1..N={n_tokens}, the prior's number of tokens; "
                        f"give step budgets in that range (e.g. --steps {','.join(map(str, default_steps(n_tokens)))})")
    temps = list(sweep.temps) if sweep.temps is not None else [sample.temp]
    return [Cell(int(s), float(t)) for t in temps for s in sorted(steps)]


def _cell_key(cell: Cell, fixed: dict[str, Any]) -> str:
    """A hash of everything that decides a cell's numbers."""
    spec = {"format": 1, **fixed, "steps": cell.steps, "temp": cell.temp}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _read_cell(path: Path, key: str) -> dict[str, Any] | None:
    """A finished cell's result, or None when it is missing, damaged or of other settings."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("key") == key else None


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------


def run_sweep(prior: str | Path, out_dir: str | Path, *, sweep: SweepConfig, sample: SampleConfig,
              cfg_eval: EvalConfig, reference: str | None = None, vqgan: str | Path | None = None, seed: int = 0,
              weights: str = "default", device: str = "auto", cache_dir: str | Path | None = None,
              overwrite: bool = False, extractor: Any = None, command: str = "",
              progress: ProgressFn | None = None) -> dict[str, Any]:
    """Sample and score every cell of the grid into `out_dir`; return the summary (sweep.json).

    `sweep` gives the grid, n, metrics and reference (`reference` overrides it); `sample` the
    sampler, its options, batch size and precision; `cfg_eval` the extractor and PRDC's k. Cell
    (steps, temp) is `uvq sample -n n --steps steps --temp temp --seed seed` into cells/<cell>/,
    scored against the reference. Everything is checked before the first write: the grid, the
    sampler, the models, the reference, the extractor's weights and the output directory.
    """
    from uvq.checkpoint import read_prior_meta, resolve_pair, verify_checkpoint
    from uvq.evaluation.features import open_set
    from uvq.evaluation.metrics import evaluate_metrics
    from uvq.registry import registry
    from uvq.runtime import resolve_device
    from uvq.sampling.chain import bind_sampler
    from uvq.sampling.outputs import write_samples

    progress = progress or null_progress
    out = Path(out_dir)
    reference = reference if reference is not None else sweep.reference
    if reference is None:
        raise UserError("no reference set: pass --reference (the training images) or set sweep.reference")

    # Validate everything before the first write.
    prior_meta = read_prior_meta(prior)
    n_tokens = math.prod(int(s) for s in prior_meta["model_config"]["latent_shape"])
    cells = sweep_grid(sweep, sample, n_tokens)
    bind_sampler(sample.sampler, sample.options)
    if "prdc" in sweep.metrics and not cfg_eval.k < sweep.n:
        raise UserError(f"PRDC's eval.k={cfg_eval.k} needs more than k samples per cell; raise sweep.n (now {sweep.n})")
    vq_meta, vq_weights = resolve_pair(prior_meta, vqgan, allow_other_vqgan=sample.allow_other_vqgan,
                                       progress=progress)
    verify_checkpoint(prior_meta["path"], "prior")
    verify_checkpoint(vq_meta["path"], "vqgan")
    inputs = (prior, prior_meta["path"], vqgan, vq_meta["path"], reference)
    check_out_dir(out, command=COMMAND, overwrite=overwrite, resume=not overwrite, inputs=inputs)
    dev = resolve_device(device)
    if extractor is None:
        extractor = registry.get("feature_extractors", cfg_eval.feature_extractor)(cfg_eval, dev)
    ref_set = open_set(reference, role="reference", progress=progress)
    if ref_set.kind == "stats" and set(sweep.metrics) - {"fid"}:
        raise UserError(f"reference {reference} holds only mu/sigma: it serves FID alone; "
                        "pass images or a features file for kid/prdc, or set sweep.metrics=[fid]")

    prior_weights = prior_meta["default_weights"] if weights == "default" else weights
    fixed = {"prior_sha256": prior_meta["weights_sha256"], "prior_weights": prior_weights,
             "vqgan_sha256": vq_meta["weights_sha256"], "vqgan_weights": vq_weights,
             "sampler": sample.sampler, "options": sample.options, "precision": sample.precision,
             "n": sweep.n, "seed": seed, "metrics": sweep.metrics, "reference_sha256": ref_set.content_sha256,
             "extractor": getattr(extractor, "name", None), "extractor_sha256": getattr(extractor, "weights_sha256", None),
             "k": cfg_eval.k}

    claim = claim_out_dir(out, command=COMMAND, overwrite=overwrite, resume=not overwrite, inputs=inputs,
                          entries=(CELLS, *OUTPUTS))
    try:
        (out / CELLS).mkdir(exist_ok=True)
        results, reused = [], 0
        progress({"event": "start", "task": "sweep", "total": len(cells), "unit": "cell"})
        for cell in cells:
            key = _cell_key(cell, fixed)
            result_path = out / CELLS / f"{cell.name}.json"
            result = _read_cell(result_path, key)
            if result is not None:
                reused += 1
            else:
                # A cell without a result of these settings is (re)done whole: its samples are
                # written afresh (--overwrite of the cell's own `uvq sample` directory).
                summary = write_samples(prior_meta["path"], out / CELLS / cell.name, vqgan=vq_meta["path"], n=sweep.n,
                                        steps=cell.steps, temp=cell.temp, seed=seed, batch_size=sample.batch_size,
                                        sampler=sample.sampler, options=sample.options, grid=False,
                                        weights=weights, device=str(dev), precision=sample.precision,
                                        allow_other_vqgan=sample.allow_other_vqgan, overwrite=True, progress=progress)
                report = evaluate_metrics(sweep.metrics, out / CELLS / cell.name, ref_set, cfg_eval=cfg_eval,
                                          device=dev, progress=progress, seed=seed, cache_dir=cache_dir,
                                          extractor=extractor)
                result = {"key": key, "steps": cell.steps, "temp": cell.temp, "n": sweep.n,
                          "results": report["results"], "warnings": report["warnings"],
                          "network_passes_per_image": summary["network_passes_per_image"],
                          "tokens_s": summary["timing"]["tokens_s"], "samples": f"{CELLS}/{cell.name}"}
                atomic_write_json(result_path, result)
            results.append(result)
            progress({"event": "advance", "task": "sweep", "n": 1,
                      "metrics": {"steps": cell.steps, "temp": cell.temp,
                                  **({"fid": round(result["results"]["fid"], 3)} if "fid" in result["results"] else {})}})
        progress({"event": "end", "task": "sweep"})

        columns = [c for m in sweep.metrics for c in METRIC_COLUMNS[m]]
        atomic_write_text(out / "sweep.csv", sweep_csv(results, columns))
        atomic_write_text(out / "sweep.md", sweep_table(results, columns))
        plot_sweep(results, columns, out / "sweep.png")
        summary = {
            "uvq_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command,
            "out_dir": str(out),
            "prior": {"path": prior_meta["path"], "sha256": prior_meta["weights_sha256"], "weights": prior_weights},
            "vqgan": {"path": vq_meta["path"], "sha256": vq_meta["weights_sha256"], "weights": vq_weights},
            "reference": ref_set.describe(),
            "extractor": extractor.describe() if hasattr(extractor, "describe") else None,
            "sweep": asdict(sweep), "sample": asdict(sample), "eval": asdict(cfg_eval), "seed": seed,
            "cells": len(results), "cells_reused": reused, "cells_run": len(results) - reused,
            "results": [{k: v for k, v in r.items() if k != "key"} for r in results],
            "files": {name: name for name in OUTPUTS if name != "sweep.json"},
        }
        atomic_write_json(out / "sweep.json", summary)
    finally:
        claim.release()
    return summary


# ---------------------------------------------------------------------------------------------
# The CSV, the table (Table 3's shape) and the plot
# ---------------------------------------------------------------------------------------------


def sweep_csv(results: list[dict[str, Any]], columns: list[str]) -> str:
    """One row per cell: steps, temp, n, the metrics, network passes per image, sampling seconds."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["steps", "temp", "n", *columns, "network_passes_per_image", "tokens_s"])
    for r in results:
        writer.writerow([r["steps"], f"{r['temp']:g}", r["n"], *(repr(float(r["results"][c])) for c in columns),
                         f"{r['network_passes_per_image']:.2f}", r["tokens_s"]])
    return buf.getvalue()


def sweep_table(results: list[dict[str, Any]], columns: list[str]) -> str:
    """Markdown in the shape of Table 3: a header row of step budgets, one row per metric and
    temperature (values to 2 decimals for FID, 4 for the rest)."""
    steps = sorted({r["steps"] for r in results})
    temps = list(dict.fromkeys(r["temp"] for r in results))
    at = {(r["steps"], r["temp"]): r["results"] for r in results}
    lines = ["| Steps | " + " | ".join(map(str, steps)) + " |", "|---|" + "---|" * len(steps)]
    for column in columns:
        digits = 2 if column == "fid" else 4
        label = "FID" if column == "fid" else column
        for t in temps:
            cells = [f"{at[(s, t)][column]:.{digits}f}" if (s, t) in at else "" for s in steps]
            lines.append(f"| {label}, temp {t:g} | " + " | ".join(cells) + " |")
    n = {r["n"] for r in results}
    lines += ["", f"{'/'.join(map(str, sorted(n)))} samples per cell."]
    return "\n".join(lines) + "\n"


def plot_sweep(results: list[dict[str, Any]], columns: list[str], path: Path) -> Path:
    """FID (or the first metric) against steps, one line per temperature; the other metrics beside it."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state or GUI backend

    temps = list(dict.fromkeys(r["temp"] for r in results))
    main = columns[0]
    rest = [c for c in columns[1:] if c != "kid_std"]
    fig = Figure(figsize=(5 + 4 * bool(rest), 3.6), dpi=100)
    axes = fig.subplots(1, 1 + bool(rest), squeeze=False)[0]
    for t in temps:
        rows = sorted((r for r in results if r["temp"] == t), key=lambda r: r["steps"])
        x = [r["steps"] for r in rows]
        axes[0].plot(x, [r["results"][main] for r in rows], marker="o", label=f"temp {t:g}")
        for column in rest:
            axes[1].plot(x, [r["results"][column] for r in rows], marker=".",
                         label=f"{column}, temp {t:g}" if len(temps) > 1 else column)
    axes[0].set(xlabel="sampling steps", ylabel=main.upper() if main == "fid" else main, title="Table 3: quality vs steps")
    axes[0].legend()
    if rest:
        axes[1].set(xlabel="sampling steps", ylabel="value")
        axes[1].legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
