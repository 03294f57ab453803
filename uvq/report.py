"""`uvq report RUN`: one self-contained HTML page for a run directory (docs/reports.md).

RUN is a directory uvq made (a `.uvq` record, uvq.files): fit-vqgan, fit-prior, sample,
upscale-canvas, inpaint, eval or pipeline. The page, RUN/report.html, shows what the directory
holds: curves of every logged metric against step (matplotlib), the reconstruction grids over
training, the loss by time step, sample, canvas and inpainting grids with their settings, the
resolved config against the recipe it came from, provenance (uvq version, command, weight and
tokenizer hashes) and evaluation metrics with their standard errors. A pipeline's page has one
section per stage and a table of contents linking them.

Self-contained: every image and plot is inline as a data: URI, the style sheet is inline, there
is no script and no reference to anything outside the file, so it opens from disk and offline.
Every string read from the run (config values, metric names, command lines, file names) is
HTML-escaped before it enters the page. The page is written atomically and declared in the
directory's record first, so `--overwrite` of the run removes it with the rest.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from uvq.files import DirLock, OutDir, atomic_write_text, read_record
from uvq.runtime import UserError

REPORT_NAME = "report.html"
TRAINING = ("fit-vqgan", "fit-prior")
GENERATION = {"sample": "samples.json", "upscale-canvas": "samples.json", "inpaint": "inpaint.json"}
KINDS = (*TRAINING, *GENERATION, "eval", "encode", "pipeline")  # a record's command, or "eval ..." for eval
MAX_STRIP = 12  # reconstruction grids shown over training (evenly spaced, the last one always)
PIPELINE_STAGES = (("vqgan", "fit-vqgan"), ("latents", "encode"), ("prior", "fit-prior"), ("samples", "sample"),
                   ("eval", "eval"))


# ---------------------------------------------------------------------------------------------
# The entry points
# ---------------------------------------------------------------------------------------------


def report_kind(run: str | Path) -> str:
    """The command that made `run` (one of KINDS, `eval` for any eval command); a UserError otherwise.

    Reads only, so that a refused report changes nothing.
    """
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run} is not a directory; give a run directory of fit-vqgan, fit-prior, sample, "
                        "upscale-canvas, inpaint, eval or pipeline")
    record = read_record(run)
    if record is None:
        raise UserError(f"{run} was not made by uvq (no .uvq record); give a run directory of fit-vqgan, fit-prior, "
                        "sample, upscale-canvas, inpaint, eval or pipeline")
    command = str(record.get("command") or "")
    kind = "eval" if command.split(" ")[0] == "eval" else command
    if kind not in KINDS:
        raise UserError(f"{run} was made by `uvq {command or 'an older version'}`, which has no report; reports "
                        f"cover {', '.join(KINDS)}")
    return kind


def build_report(run: str | Path) -> str:
    """The report page of `run` as HTML text (reads only)."""
    run = Path(run)
    kind = report_kind(run)
    title = f"uvq {kind}: {run.resolve().name}"
    body = [f"<h1>{_h(title)}</h1>", f"<p class=path>{_h(run.resolve())}</p>"]
    if kind == "pipeline":
        body += _pipeline(run)
    else:
        body += _section(run, kind, show_config=True)
    return _page(title, body)


def write_report(run: str | Path, *, lock: bool = True) -> Path:
    """Write RUN/report.html atomically and return its path.

    `lock` takes the directory's one-writer lock for the write; a caller that already holds it (a
    training loop refreshing its report, the pipeline at its end) passes False.
    """
    run = Path(run)
    kind = report_kind(run)
    text = build_report(run)
    held = DirLock(run, "report").acquire() if lock else None
    try:
        command = (read_record(run) or {}).get("command") or kind
        OutDir(run, command, None).declare(entries=(REPORT_NAME,))
        atomic_write_text(run / REPORT_NAME, text)
    finally:
        if held is not None:
            held.release()
    return run / REPORT_NAME


# ---------------------------------------------------------------------------------------------
# Sections: one per kind of directory
# ---------------------------------------------------------------------------------------------


def _section(run: Path, kind: str, *, show_config: bool) -> list[str]:
    if kind in TRAINING:
        return _training(run, kind, show_config=show_config)
    if kind in GENERATION:
        return _generation(run, kind)
    if kind == "encode":
        return _latents(run)
    return _evaluation(run)


def _pipeline(run: Path) -> list[str]:
    """The stage table (status, time, links), the run's config, then one section per stage present."""
    state = _read_json(run / "pipeline.json", {"stages": {}})
    stages = state.get("stages", {}) if isinstance(state, dict) else {}
    present = [(name, cmd) for name, cmd in PIPELINE_STAGES if (run / name).is_dir()]
    rows = []
    for name, cmd in PIPELINE_STAGES:
        rec = stages.get(name, {}) if isinstance(stages.get(name), dict) else {}
        link = f'<a href="#stage-{name}">{_h(name)}</a>' if (run / name).is_dir() else _h(name)
        rows.append([link, _h(cmd), _h(rec.get("status", "not run")), _h(_num(rec.get("seconds"), " s")),
                     _h(rec.get("finished", ""))])
    out = ["<h2>Stages</h2>", _table(["stage", "command", "status", "time", "finished"], rows, raw=True)]
    command_src = next((run / name for name, _ in present if (run / name / "command.txt").is_file()), run)
    out += _config(run, command_src)
    for name, cmd in present:
        kind = report_kind(run / name) if read_record(run / name) is not None else cmd
        out.append(f'<section id="stage-{name}"><h2>{_h(name)} <small>({_h(cmd)})</small></h2>')
        out += _section(run / name, kind, show_config=False)
        out.append("</section>")
    return out


def _training(run: Path, kind: str, *, show_config: bool) -> list[str]:
    """Provenance, config, curves of every metric, the image strips, checkpoints and evaluations."""
    from uvq.rundir import RunDir

    out = ["<h3>Provenance</h3>", _provenance(run, kind)]
    if show_config:
        out += _config(run, run)
    try:
        records = RunDir(run, writes=False).read_metrics()
    except UserError as exc:
        records, out = [], [*out, _note(str(exc))]
    out.append("<h3>Curves</h3>")
    out += _curves(records) if records else [_note("no metrics logged yet (metrics.jsonl is empty or missing)")]
    images = sorted((run / "images").glob("*.png")) if (run / "images").is_dir() else []
    recon = [p for p in images if p.name.startswith("recon-")]
    if recon:
        out += ["<h3>Reconstructions over training</h3>",
                _note("rows: training inputs, their reconstructions (and the EMA weights' reconstructions)"),
                _strip([(p, f"step {_step_of(p)}") for p in _spaced(recon, MAX_STRIP)])]
    by_t = [p for p in images if p.name.startswith("loss-by-t-")]
    if by_t:
        out += ["<h3>Loss by time step</h3>", _figure(_b64_file(by_t[-1]), f"step {_step_of(by_t[-1])} "
                                                                            f"({len(by_t)} plots in images/)")]
    out += _checkpoints(run)
    out += _evaluation(run, heading="<h3>Evaluations in this directory</h3>", quiet=True)
    return out


def _generation(run: Path, kind: str) -> list[str]:
    """Settings, provenance and timing of sample / upscale-canvas / inpaint, and their grids."""
    meta = _read_json(run / GENERATION[kind], None)
    if not isinstance(meta, dict):
        return [_note(f"{GENERATION[kind]} is missing or unreadable: this {kind} run did not finish")]
    settings = {k: v for k, v in meta.items() if k not in ("prior", "vqgan", "timing", "files", "inputs", "grid",
                                                           "out_dir")}
    out = ["<h3>Settings</h3>", _kv_table(_flatten(settings))]
    models = [[_h(role), _h(m.get("path", "")), _h(m.get("step", "")), _h(m.get("weights", "")),
               f"<code>{_h(m.get('sha256', ''))}</code>"]
              for role in ("prior", "vqgan") if isinstance(m := meta.get(role), dict)]
    if models:
        out += ["<h3>Models</h3>", _table(["model", "checkpoint", "step", "weights", "weights sha256"], models, raw=True)]
    if isinstance(meta.get("timing"), dict):
        out += ["<h3>Timing</h3>", _kv_table(meta["timing"])]
    caption = ", ".join(f"{k}={meta[k]}" for k in ("n", "steps", "temperature", "sampler", "seed") if k in meta)
    grids: list[tuple[Path, str]] = []
    if kind == "inpaint":
        for item in meta.get("inputs", []) if isinstance(meta.get("inputs"), list) else []:
            if isinstance(item, dict) and item.get("grid"):
                grids.append((run / Path(str(item["grid"])).name,
                              f"{item.get('name', '')}: {item.get('masked_latents', '?')} of {item.get('latents', '?')} "
                              f"latents regenerated from t={item.get('t_start', '?')}; {caption}"))
    elif (run / "grid.png").is_file():
        grids.append((run / "grid.png", caption))
    if grids:
        out.append("<h3>Grids</h3>")
        legend = {"sample": "rows labelled with the index of their first sample",
                  "upscale-canvas": "canvases, rows labelled with the index of their first canvas",
                  "inpaint": "columns: the input, the mask (grey: regenerated) and the completions"}[kind]
        out.append(_note(legend))
        out += [_figure(_b64_file(p), text) for p, text in grids if p.is_file()]
    return out


def _latents(run: Path) -> list[str]:
    manifest = _read_json(run / "manifest.json", None)
    if not isinstance(manifest, dict):
        return [_note("manifest.json is missing or unreadable: this encode did not finish")]
    tok = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    rows = {"samples": manifest.get("num_samples"), "latent shape": manifest.get("latent_shape"),
            "codebook size": manifest.get("codebook_size"), "shards": len(manifest.get("shards", []) or []),
            "tokenizer checkpoint": tok.get("path"), "tokenizer step": tok.get("step"),
            "tokenizer weights": tok.get("weights"), "tokenizer sha256": tok.get("sha256")}
    return ["<h3>Latent shards</h3>", _kv_table(rows)]


def _evaluation(run: Path, *, heading: str = "<h3>Metrics</h3>", quiet: bool = False) -> list[str]:
    """Every evaluation report in `run` (eval JSONs: set metrics, recon, ELBO) as metric, value, stderr."""
    found = []
    for p in sorted(run.glob("*.json")):
        if p.name in ("samples.json", "inpaint.json", "pipeline.json", "env.json", "encode.json", "manifest.json"):
            continue
        data = _read_json(p, None)
        if isinstance(data, dict):
            rows = _metric_rows(data)
            if rows:
                found += [f"<h4>{_h(p.name)}</h4>", _table(["metric", "value", "± standard error"], rows)]
    grids = sorted(run.glob("recon-*.png"))
    found += [_figure(_b64_file(p), f"{p.name}: originals above their reconstructions") for p in grids]
    if not found:
        return [] if quiet else [_note("no evaluation results in this directory")]
    return [heading, *found]


def _metric_rows(data: dict[str, Any]) -> list[list[str]]:
    """(metric, value, stderr) of every number in an evaluation report; `x_stderr` / `mean_stderr` pair with x."""
    flat = _flatten(data)
    rows = []
    for key, value in flat.items():
        if not _is_number(value) or key.endswith(("_stderr", "_se", "stderr")):
            continue
        err = next((flat[k] for k in (f"{key}_stderr", f"{key}_se") if _is_number(flat.get(k))), None)
        rows.append([key, _num(value), _num(err) if err is not None else ""])
    return rows


# ---------------------------------------------------------------------------------------------
# Tables: provenance, config against its recipe, checkpoints
# ---------------------------------------------------------------------------------------------


def _provenance(run: Path, kind: str) -> str:
    env = _read_json(run / "env.json", {})
    rows: dict[str, Any] = {}
    if isinstance(env, dict):
        for k in ("uvq_version", "torch_version", "python", "platform", "device", "cuda_device", "world_size",
                  "git_commit", "started"):
            if k in env:
                rows[k] = env[k]
        if env.get("previous"):
            rows["earlier starts"] = len(env["previous"])
    commands = _commands(run)
    for i, line in enumerate(commands):
        rows["command" if i == 0 else f"resumed ({i})"] = line
    meta = _checkpoint_meta(run)
    if meta:
        for name, digest in (meta.get("weights_sha256") or {}).items():
            rows[f"weights sha256 ({name})" + (", the tokenizer hash" if kind == "fit-vqgan" else "")] = digest
        tok = (meta.get("provenance") or {}).get("tokenizer") if isinstance(meta.get("provenance"), dict) else None
        if isinstance(tok, dict):
            rows["tokenizer sha256 (the VQGAN of its latents)"] = tok.get("sha256")
            rows["tokenizer checkpoint"] = tok.get("path")
    return _kv_table(rows)


def _commands(run: Path) -> list[str]:
    f = run / "command.txt"
    try:
        return [line for line in f.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return []


def _recipe_of(command: str) -> tuple[str | None, list[str]]:
    """(recipe, overrides) of a `uvq fit-vqgan | fit-prior | pipeline RECIPE key=value ...` line."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None, []
    for i, w in enumerate(words):
        if w in ("fit-vqgan", "fit-prior", "pipeline") and i + 1 < len(words) and not words[i + 1].startswith("-"):
            rest = words[i + 2:]
            overrides = [r for r in rest if "=" in r and not r.startswith("-") and "." in r.split("=", 1)[0]]
            return words[i + 1], overrides
    return None, []


def _config(run: Path, command_dir: Path) -> list[str]:
    """The resolved config.yaml, against the recipe named in the first command line."""
    from uvq.config import load_config

    try:
        resolved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return ["<h3>Config</h3>", _note("config.yaml is missing or unreadable")]
    if not isinstance(resolved, dict):
        return ["<h3>Config</h3>", _note("config.yaml is not a mapping")]
    flat = _flatten(resolved)
    commands = _commands(command_dir)
    recipe, overrides = _recipe_of(commands[0]) if commands else (None, [])
    out = ["<h3>Config</h3>"]
    if recipe is None:
        out.append(_note("the command line names no recipe; the resolved config alone"))
    else:
        try:
            base = _flatten(load_config(recipe).to_dict())
        except (UserError, OSError) as exc:
            out.append(_note(f"recipe {recipe} cannot be read now ({exc}); the resolved config alone"))
        else:
            changed = sorted(k for k in flat.keys() | base.keys() if flat.get(k) != base.get(k))
            out.append(_note(f"the run's resolved config against recipe {recipe} as it reads now "
                             f"(overrides on the command line: {' '.join(overrides) or 'none'}; derived values "
                             "such as the learning rate times world size also differ)"))
            out.append(_table(["key", "recipe", "this run"], [[k, _yaml(base.get(k, "(absent)")),
                                                               _yaml(flat.get(k, "(absent)"))] for k in changed])
                       if changed else _note("no key differs from the recipe"))
    out.append(f"<details><summary>resolved config ({len(flat)} keys)</summary>{_kv_table(flat)}</details>")
    return out


def _checkpoint_meta(run: Path) -> dict[str, Any] | None:
    for name in ("best", "last"):
        meta = _read_json(run / "checkpoints" / name / "meta.json", None)
        if isinstance(meta, dict):
            return meta
    return None


def _checkpoints(run: Path) -> list[str]:
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    best = (folder / "best").resolve().name if (folder / "best").exists() else None
    last = (folder / "last").resolve().name if (folder / "last").exists() else None
    rows = []
    for d in sorted(p for p in folder.iterdir() if p.name.startswith("step-") and p.is_dir() and not p.is_symlink()):
        meta = _read_json(d / "meta.json", {})
        marks = [m for m, n in (("best", best), ("last", last)) if n == d.name]
        extra = meta.get("best") if isinstance(meta, dict) and isinstance(meta.get("best"), dict) else {}
        rows.append([d.name, meta.get("step", "") if isinstance(meta, dict) else "", ", ".join(marks),
                     _num(extra.get("val_bits_per_token")) if d.name == best else ""])
    return ["<h3>Checkpoints</h3>", _table(["directory", "step", "link", "best val bits/token"], rows)] if rows else []


# ---------------------------------------------------------------------------------------------
# Curves (matplotlib, through uvq.images)
# ---------------------------------------------------------------------------------------------


def _group(key: str) -> str:
    if key.startswith("val"):
        return "validation"
    if key == "lr" or key.startswith("lr_") or key.endswith("_lr"):
        return "learning rate"
    if "per_s" in key:
        return "throughput"
    return "training"


def _curves(records: list[dict[str, Any]]) -> list[str]:
    """One figure per group (training, validation, learning rate, throughput), one panel per metric."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for r in records:
        step = r.get("step")
        if not _is_number(step):
            continue
        for k, v in r.items():
            if k != "step" and _is_number(v) and math.isfinite(v):
                xs, ys = series.setdefault(str(k), ([], []))
                xs.append(float(step))
                ys.append(float(v))
    out = []
    for group in ("training", "validation", "learning rate", "throughput"):
        keys = [k for k in series if _group(k) == group and not k.endswith("_stderr")]
        if keys:
            out.append(_figure(_plot_panels(keys, series), f"{group}: {', '.join(keys)} against step"))
    return out or [_note("no numeric metrics logged")]


def _plot_panels(keys: Sequence[str], series: dict[str, tuple[list[float], list[float]]]) -> str:
    from uvq.images import figure, figure_png

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = figure(3.4 * cols, 2.5 * rows)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        xs, ys = series[key]
        err = _stderr_of(key, keys, series)
        marker = "o" if len(xs) <= 20 else None
        if err is not None and len(err) == len(ys):
            ax.errorbar(xs, ys, yerr=err, marker=marker, markersize=3, capsize=2, linewidth=1)
        else:
            ax.plot(xs, ys, marker=marker, markersize=3, linewidth=1)
        positive = [y for y in ys if y > 0]
        if len(positive) == len(ys) and len(ys) > 1 and max(ys) / min(ys) >= 20:
            ax.set_yscale("log")  # a loss over decades reads on a log scale
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return base64.b64encode(figure_png(fig)).decode("ascii")


def _stderr_of(key: str, keys: Sequence[str], series: dict[str, tuple[list[float], list[float]]]) -> list[float] | None:
    """The error bars of `key`: `key_stderr`, or `val_stderr` for the one validation metric beside it."""
    if f"{key}_stderr" in series:
        return series[f"{key}_stderr"][1]
    if _group(key) == "validation" and "val_stderr" in series and len(keys) == 1:
        return series["val_stderr"][1]
    return None


# ---------------------------------------------------------------------------------------------
# HTML pieces: every string from the run goes through _h
# ---------------------------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px auto;max-width:1200px;padding:0 16px;color:#222}
h1{font-size:22px;margin-bottom:0}h2{border-bottom:1px solid #ccc;margin-top:32px}h3{margin-top:24px}
.path{color:#666;margin-top:4px}.note{color:#555;font-style:italic}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top;max-width:720px;overflow-wrap:anywhere}th{background:#f4f4f4}
figure{display:inline-block;margin:8px 12px 8px 0;vertical-align:top}figcaption{font-size:12px;color:#444}
img{image-rendering:pixelated;max-width:100%}.strip{display:flex;overflow-x:auto;gap:8px}
.strip figure{flex:none}code{font-size:12px}small{color:#666;font-weight:normal}
"""


def _page(title: str, body: Iterable[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>{_h(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _h(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _note(text: str) -> str:
    return f"<p class=note>{_h(text)}</p>"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, raw: bool = False) -> str:
    """A table; cells are escaped unless `raw` (cells the caller built from escaped pieces)."""
    cell = (lambda v: str(v)) if raw else _h
    head = "".join(f"<th>{_h(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv_table(rows: dict[str, Any]) -> str:
    return _table(["key", "value"], [[k, _yaml(v)] for k, v in rows.items() if v is not None]) if rows else ""


def _figure(b64_png: str | None, caption: str) -> str:
    if b64_png is None:
        return _note(f"missing image: {caption}")
    return (f'<figure><img src="data:image/png;base64,{b64_png}" alt="{_h(caption)}">'
            f"<figcaption>{_h(caption)}</figcaption></figure>")


def _strip(items: Sequence[tuple[Path, str]]) -> str:
    return '<div class=strip>' + "".join(_figure(_b64_file(p), caption) for p, caption in items) + "</div>"


def _b64_file(path: Path) -> str | None:
    try:
        return base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Small readers
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return default


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v: Any, unit: str = "") -> str:
    if not _is_number(v):
        return "" if v is None else str(v)
    return (f"{v:.4g}" if isinstance(v, float) else str(v)) + unit


def _yaml(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _step_of(path: Path) -> int | str:
    tail = path.stem.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else tail


def _spaced(items: Sequence[Path], k: int) -> list[Path]:
    """At most k items, evenly spaced, the first and the last always among them."""
    if len(items) <= k:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


__all__ = ["REPORT_NAME", "build_report", "report_kind", "write_report"]
