"""Checkpoints: directories of safetensors weights that carry their own config.

    checkpoints/step-00001000/
      model.safetensors   raw weights       (safetensors metadata {"uvq": json(meta)})
      ema.safetensors     EMA weights       (when trained with EMA)
      meta.json           kind, step, full config, model config, default weights, provenance
      trainer.pt          optimisers, EMA, step, RNG and data position (torch.load weights_only)
    checkpoints/last -> step-00001000      (relative symlinks, replaced atomically)
    checkpoints/best -> step-00000800

A checkpoint directory is written under a temporary name and renamed, so a reader never sees a
half-written one. Weights are never unpickled: safetensors for tensors, and
`torch.load(weights_only=True)` for trainer state.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from uvq import __version__
from uvq.files import atomic_dir, replace_symlink, sha256_file
from uvq.runtime import UserError, resolve_device

KINDS = ("vqgan", "prior")
WEIGHT_FILES = {"model": "model.safetensors", "ema": "ema.safetensors"}
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _state_dict(obj: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = obj.state_dict() if isinstance(obj, torch.nn.Module) else dict(obj)
    # safetensors refuses shared storage; clone to contiguous tensors on the CPU
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def write_checkpoint_dir(path: Path, *, kind: str, model_config: dict[str, Any],
                         weights: Mapping[str, torch.nn.Module | Mapping[str, torch.Tensor]],
                         step: int = 0, config: dict[str, Any] | None = None,
                         provenance: dict[str, Any] | None = None, default_weights: str | None = None,
                         trainer_state: dict[str, Any] | None = None, extra_meta: dict[str, Any] | None = None) -> Path:
    """Write one checkpoint directory at `path` atomically. `weights` maps "model"/"ema" to modules."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    unknown = set(weights) - set(WEIGHT_FILES)
    if unknown or not weights:
        raise ValueError(f"weights keys must be among {sorted(WEIGHT_FILES)}")
    default_weights = default_weights or ("ema" if "ema" in weights else "model")
    meta = {
        "kind": kind,
        "step": int(step),
        "model_config": model_config,
        "default_weights": default_weights,
        "config": config,
        "provenance": provenance or {},
        "uvq_version": __version__,
        **(extra_meta or {}),
    }
    with atomic_dir(path) as tmp:
        small_meta = {"kind": kind, "model_config": model_config, "step": int(step), "uvq_version": __version__}
        for which, obj in weights.items():
            save_file(_state_dict(obj), str(tmp / WEIGHT_FILES[which]), metadata={"uvq": json.dumps(small_meta)})
        meta["weights_sha256"] = {w: sha256_file(tmp / WEIGHT_FILES[w]) for w in weights}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer.pt")
    return path


def save_checkpoint(run_dir: str | Path, step: int, *, keep_last: int = 3, **kwargs) -> Path:
    """Write `run_dir/checkpoints/step-XXXXXXXX`, point `last` at it, keep the last K (and best)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    path = write_checkpoint_dir(root / name, step=step, **kwargs)
    replace_symlink(root / "last", name)
    _prune(root, keep_last)
    return path


def mark_best(run_dir: str | Path, step_dir: str | Path) -> None:
    root = Path(run_dir) / "checkpoints"
    replace_symlink(root / "best", Path(step_dir).name)


def _prune(root: Path, keep_last: int) -> None:
    protected = {(root / link).resolve().name for link in ("last", "best") if (root / link).exists()}
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    for _, p in steps[:-keep_last] if keep_last > 0 else []:
        if p.name not in protected:
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path, prefer: tuple[str, ...] = ("best", "last")) -> Path:
    """Accept a checkpoint directory, a `checkpoints/` folder, or a run directory."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist; give a checkpoint directory (with meta.json) or a run directory")
    if (p / "meta.json").is_file():
        return p.resolve()
    for base in (p / "checkpoints", p):
        for link in prefer:
            cand = base / link
            if (cand / "meta.json").is_file():
                return cand.resolve()
    if p.is_file():
        raise UserError(f"{p} is a file, not a uvq checkpoint directory; foreign checkpoints are converted with `uvq import`")
    raise UserError(f"no uvq checkpoint in {p}: expected meta.json there, or checkpoints/{'|'.join(prefer)} below it")


def read_meta(path: str | Path) -> dict[str, Any]:
    ckpt = resolve_checkpoint(path)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{ckpt / 'meta.json'} is corrupt ({exc}); the checkpoint cannot be used") from exc
    meta["path"] = str(ckpt)
    return meta


def weights_file(path: str | Path, weights: str = "default") -> Path:
    meta = read_meta(path)
    which = meta["default_weights"] if weights == "default" else weights
    if which not in WEIGHT_FILES:
        raise UserError(f"weights must be default, ema or model, not {weights!r}")
    f = Path(meta["path"]) / WEIGHT_FILES[which]
    if not f.is_file():
        raise UserError(f"checkpoint {meta['path']} has no {which} weights ({f.name}); "
                        f"choose --weights {'model' if which == 'ema' else 'ema'}")
    return f


def load_state_dict(path: str | Path, weights: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint's weights (safetensors) and its meta."""
    meta = read_meta(path)
    f = weights_file(path, weights)
    try:
        sd = load_file(str(f))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{f} is not a readable safetensors file ({exc}); the checkpoint is damaged") from exc
    meta["weights_path"] = str(f)
    return sd, meta


def load_model(path: str | Path, kind: str, *, weights: str = "default", device: str | torch.device = "cpu"):
    """Rebuild the module from the embedded config (through the registry) and load its weights strictly."""
    sd, meta = load_state_dict(path, weights)
    if meta.get("kind") != kind:
        raise UserError(f"{meta['path']} is a {meta.get('kind')} checkpoint, but a {kind} checkpoint is needed here")
    model = build_model(kind, meta["model_config"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {meta['path']} does not match its own config: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    meta["weights_sha256"] = meta.get("weights_sha256", {}).get(
        meta["default_weights"] if weights == "default" else weights) or sha256_file(meta["weights_path"])
    return model.to(device).eval(), meta


def build_model(kind: str, model_config: dict[str, Any]) -> torch.nn.Module:
    """Build a VQGAN or prior from a config dict (a checkpoint's `model_config`)."""
    from uvq.config import PriorConfig, VQGANConfig, section_from_dict
    from uvq.registry import registry

    if kind == "vqgan":
        from uvq.vqgan.model import build_vqgan

        return build_vqgan(section_from_dict(VQGANConfig, model_config, "model.vqgan"))
    cfg = section_from_dict(PriorConfig, model_config, "model.prior")
    return registry.get("priors", cfg.name)(cfg)


def load_trainer_state(ckpt_dir: str | Path) -> dict[str, Any]:
    f = Path(ckpt_dir) / "trainer.pt"
    if not f.is_file():
        raise UserError(f"{ckpt_dir} has no trainer.pt; it cannot be resumed (it may be an imported or exported checkpoint)")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{f} cannot be loaded safely ({type(exc).__name__}); the checkpoint is damaged") from exc


# ---------------------------------------------------------------------------------------------
# Which checkpoints: the prior a user named (or that a run directory holds), and its VQGAN
# ---------------------------------------------------------------------------------------------


def _prior_in(path: Path) -> Path | None:
    """The prior checkpoint in `path` (a checkpoint, a prior run, or a pipeline run), or None."""
    for cand in (path / "prior", path):
        if not cand.exists():
            continue
        try:
            ckpt = resolve_checkpoint(cand)
        except UserError:
            continue
        if read_meta(ckpt).get("kind") == "prior":
            return ckpt
    return None


def find_prior(prior: str | Path | None = None, *, run: str | Path | None = None, recipe: str | None = None,
               cwd: str | Path | None = None) -> tuple[Path, str]:
    """The prior checkpoint to sample from, and a phrase saying where it was found.

    In order: `prior` (a checkpoint or run directory); `run` (a pipeline run, with its prior/
    stage, or a fit-prior run); `recipe` (the pipeline's default run runs/<recipe>, then the
    fit-prior default runs/prior-<recipe>); else the current directory (a pipeline or prior run,
    or a stage directory inside a pipeline run). The best checkpoint is preferred to the last.
    """
    if prior is not None:
        ckpt = resolve_checkpoint(prior)
        if read_meta(ckpt).get("kind") != "prior":
            raise UserError(f"--prior {prior} is a {read_meta(ckpt).get('kind')} checkpoint, not a prior")
        return ckpt, f"--prior {prior}"
    if run is not None:
        if not Path(run).exists():
            raise UserError(f"run directory {run} does not exist; give --run a pipeline or fit-prior run directory")
        found = _prior_in(Path(run))
        if found is None:
            raise UserError(f"no prior checkpoint in run directory {run} (looked in {run}/prior and {run}); "
                            "train one with `uvq pipeline` or `uvq fit-prior`, or pass --prior")
        return found, f"run directory {run}"
    if recipe is not None:
        stem = Path(recipe).stem
        tried = [Path("runs") / stem, Path("runs") / f"prior-{stem}"]
        for cand in tried:
            if (found := _prior_in(cand)) is not None:
                return found, f"recipe {recipe} ({cand})"
        raise UserError(f"no trained prior for recipe {recipe} (looked in {', '.join(map(str, tried))}); "
                        f"run `uvq pipeline {recipe}` first, or pass --prior / --run")
    here = Path(cwd or Path.cwd())
    for cand in (here, here.parent):
        if (found := _prior_in(cand)) is not None:
            return found, f"the current directory ({cand})"
    raise UserError("no prior checkpoint given and none in the current directory; pass --prior CKPT, "
                    "--run DIR or --recipe NAME")


def find_vqgan(prior_meta: dict[str, Any], vqgan: str | Path | None = None) -> tuple[Path, str, str]:
    """The VQGAN that decodes a prior's codes: (checkpoint, weights, where it was found).

    Without `vqgan`, the prior's provenance names the tokenizer that wrote its training latents
    (its path and weight hash). When that path has moved, the VQGAN stage beside the prior's run
    (a pipeline run's vqgan/) is searched for a checkpoint with the same weight hash.
    """
    if vqgan is not None:
        ckpt = resolve_checkpoint(vqgan)
        if read_meta(ckpt).get("kind") != "vqgan":
            raise UserError(f"--vqgan {vqgan} is a {read_meta(ckpt).get('kind')} checkpoint, not a VQGAN")
        return ckpt, "default", f"--vqgan {vqgan}"
    tok = (prior_meta.get("provenance") or {}).get("tokenizer")
    if not tok:
        raise UserError(f"prior {prior_meta['path']} was trained on latents without a tokenizer record, so its "
                        "VQGAN is unknown; pass --vqgan CKPT")
    weights = tok.get("weights") or "default"
    want = tok.get("sha256")
    candidates: list[Path] = []
    if tok.get("path"):
        candidates.append(Path(tok["path"]))
    prior_run = Path(prior_meta["path"]).parent.parent  # <run>/checkpoints/step-X -> <run>
    stage_vqgan = prior_run.parent / "vqgan" / "checkpoints"
    if stage_vqgan.is_dir():
        candidates += sorted(p for p in stage_vqgan.iterdir() if (p / "meta.json").is_file())
    for cand in candidates:
        if not (cand / "meta.json").is_file():
            continue
        meta = read_meta(cand)
        if meta.get("kind") == "vqgan" and _weights_sha(meta, weights) == want:
            return Path(meta["path"]), weights, "the prior's provenance"
    raise UserError(f"the VQGAN that encoded prior {prior_meta['path']}'s latents (weights {str(want)[:12]}, "
                    f"{tok.get('path')}) is not found; pass --vqgan CKPT")


def _weights_sha(meta: dict[str, Any], weights: str) -> str | None:
    which = meta.get("default_weights") if weights == "default" else weights
    return (meta.get("weights_sha256") or {}).get(which)


def check_pair(prior_meta: dict[str, Any], vqgan_meta: dict[str, Any]) -> None:
    """A prior and a VQGAN fit together when codebook size and latent shape agree."""
    from uvq.config import VQGANConfig, section_from_dict

    pc, vc = prior_meta["model_config"], section_from_dict(VQGANConfig, vqgan_meta["model_config"], "model.vqgan")
    if int(pc["codebook_size"]) != vc.codebook_size:
        raise UserError(f"prior {prior_meta['path']} predicts {pc['codebook_size']} codes but VQGAN "
                        f"{vqgan_meta['path']} has a codebook of {vc.codebook_size}; use the VQGAN the prior was trained with")
    if [int(s) for s in pc["latent_shape"]] != list(vc.latent_shape):
        raise UserError(f"prior {prior_meta['path']} makes {list(pc['latent_shape'])} token grids but VQGAN "
                        f"{vqgan_meta['path']} decodes {list(vc.latent_shape)}; use the VQGAN the prior was trained with")


def read_prior_meta(prior: str | Path) -> dict[str, Any]:
    """A prior checkpoint's meta, refusing checkpoints of another kind."""
    prior_meta = read_meta(prior)
    if prior_meta.get("kind") != "prior":
        raise UserError(f"{prior} is a {prior_meta.get('kind')} checkpoint, not a prior")
    return prior_meta


def resolve_pair(prior_meta: dict[str, Any], vqgan: str | Path | None) -> tuple[dict[str, Any], str]:
    """The VQGAN that decodes a prior's tokens (its provenance, or `vqgan`), checked to fit: (meta, weights)."""
    vq_path, vq_weights, _ = find_vqgan(prior_meta, vqgan)
    vq_meta = read_meta(vq_path)
    check_pair(prior_meta, vq_meta)
    return vq_meta, vq_weights


# ---------------------------------------------------------------------------------------------
# A prior and its VQGAN, loaded together (the prelude of sample, canvas, inpaint and uvq.load_pair)
# ---------------------------------------------------------------------------------------------


class Pair(NamedTuple):
    """A loaded prior and the VQGAN that decodes its tokens (None when not asked for), in eval mode."""

    prior: torch.nn.Module
    prior_meta: dict[str, Any]  # read_meta's record; weights_sha256 is the loaded file's
    vqgan: torch.nn.Module | None
    vqgan_meta: dict[str, Any] | None
    vqgan_weights: str | None  # the VQGAN weights loaded: "ema" or "model"


def load_pair(prior: str | Path, vqgan: str | Path | None = None, *, weights: str = "default",
              device: str | torch.device = "auto", decoder: bool = True) -> Pair:
    """Load a prior checkpoint (or run directory) and the VQGAN its provenance names (or `vqgan`).

    The pair is checked to fit (codebook, latent grid, tokenizer hash) before either is built.
    `weights` chooses the prior's weights (default, ema or model); the VQGAN's are those that
    wrote the prior's training latents (its provenance), or its default with an explicit `vqgan`.
    `decoder=False` loads the prior alone (codes only).
    """
    dev = resolve_device(device)
    prior_meta = read_prior_meta(prior)
    vq_meta = vq_weights = vq_model = None
    if decoder:
        vq_meta, vq_weights = resolve_pair(prior_meta, vqgan)
    net, prior_meta = load_model(prior, "prior", weights=weights, device=dev)
    if vq_meta is not None:
        vq_model, vq_meta = load_model(vq_meta["path"], "vqgan", weights=vq_weights, device=dev)
        vq_weights = vq_meta["default_weights"] if vq_weights == "default" else vq_weights
    return Pair(net, prior_meta, vq_model, vq_meta, vq_weights)
