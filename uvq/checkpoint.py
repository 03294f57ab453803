"""Checkpoints: directories of safetensors weights that carry their own config.

    checkpoints/step-00001000/
      model.safetensors   raw weights       (safetensors metadata {"uvq": json(meta)})
      ema.safetensors     EMA weights       (when trained with EMA)
      meta.json           kind, step, full config, model config, default weights, provenance,
                          the sha256 of every weight file and of trainer.pt
      trainer.pt          optimisers, EMA, step, RNG and data position (torch.load weights_only)
      .uvq-used-by/       one record per downstream artifact that names these weights (encode)
    checkpoints/last -> step-00001000      (relative symlinks, replaced atomically)
    checkpoints/best -> step-00000800

A checkpoint directory is written under a temporary name and renamed, so a reader never sees a
half-written one. Weights are never unpickled: safetensors for tensors, and
`torch.load(weights_only=True)` for trainer state. Loading verifies before it trusts
(docs/reliability.md, "Integrity"): meta.json is an object of the expected fields, the
architecture is of a plausible size before anything is built, every file matches its sha256,
and the tensors match the architecture's names, shapes and dtypes and are finite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from uvq import __version__
from uvq.files import atomic_dir, atomic_write_json, replace_symlink, sha256_bytes, sha256_file
from uvq.progress import ProgressFn, null_progress
from uvq.runtime import UserError, resolve_device

KINDS = ("vqgan", "prior")
WEIGHT_FILES = {"model": "model.safetensors", "ema": "ema.safetensors"}
TRAINER_FILE = "trainer.pt"
UNVERIFIED = ".uvq-unverified"  # inside a checkpoint that an import wrote but has not verified yet
USED_BY = ".uvq-used-by"  # inside a checkpoint: records of the artifacts made with its weights
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STALE = re.compile(r"^\.(step-\d+\.[^/]*\.tmp|(last|best)\.\d+\.lnk)$")  # killed writes (atomic_dir, replace_symlink)

# Plausible sizes, checked from meta.json before a model is built (docs/reliability.md). The
# paper's models have about 80M parameters; 2e9 float32 parameters are 8 GB.
MAX_PARAMETERS = 2_000_000_000
MAX_IMG_SIZE = 4096  # the decoder's first activation is img_size^2 * nf floats per image (8.6 GB at 4096, nf=128)
MAX_TOKENS = 65_536  # a 256 x 256 token grid; attention is quadratic in it
MAX_BLOCKS = 1_000  # residual / transformer blocks; bounds the cost of building the model to count it


def _state_dict(obj: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = obj.state_dict() if isinstance(obj, torch.nn.Module) else dict(obj)
    # safetensors refuses shared storage; clone to contiguous tensors on the CPU
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def write_checkpoint_dir(path: Path, *, kind: str, model_config: dict[str, Any],
                         weights: Mapping[str, torch.nn.Module | Mapping[str, torch.Tensor]],
                         step: int = 0, config: dict[str, Any] | None = None,
                         provenance: dict[str, Any] | None = None, default_weights: str | None = None,
                         trainer_state: dict[str, Any] | None = None, extra_meta: dict[str, Any] | None = None,
                         unverified: bool = False) -> Path:
    """Write one checkpoint directory at `path` atomically. `weights` maps "model"/"ema" to modules.

    `unverified` leaves the UNVERIFIED marker inside (an import, until `mark_verified`), so that
    a process killed before the verification leaves a checkpoint no reader accepts.
    """
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
        if unverified:
            (tmp / UNVERIFIED).touch()
        if (path / USED_BY).is_dir():  # rewriting a step (after a resume) keeps its downstream records
            shutil.copytree(path / USED_BY, tmp / USED_BY)
        small_meta = {"kind": kind, "model_config": model_config, "step": int(step), "uvq_version": __version__}
        for which, obj in weights.items():
            save_file(_state_dict(obj), str(tmp / WEIGHT_FILES[which]), metadata={"uvq": json.dumps(small_meta)})
        meta["weights_sha256"] = {w: sha256_file(tmp / WEIGHT_FILES[w]) for w in weights}
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_FILE)
            meta["trainer_sha256"] = sha256_file(tmp / TRAINER_FILE)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
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


def _link_name(link: Path) -> str | None:
    """The step directory a `last` / `best` link names (even when it dangles), or None without a link."""
    return os.readlink(link) if link.is_symlink() else None


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    """The finished step directories of `root` (with meta.json), oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _STEP_DIR.match(p.name)) and p.is_dir() and (p / "meta.json").is_file())


def _recorded_best(root: Path) -> str | None:
    """The best step as the newest checkpoint recorded it (meta.json "best": {"step": ...})."""
    for _, p in reversed(_complete_steps(root)):
        try:
            best = json.loads((p / "meta.json").read_text()).get("best")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(best, dict) and isinstance(best.get("step"), int):
            return f"step-{best['step']:08d}"
        return None
    return None


def is_used_downstream(ckpt: Path) -> bool:
    """Whether an artifact (latents written by `uvq encode`) recorded that it was made with `ckpt`."""
    records = ckpt / USED_BY
    return records.is_dir() and any(records.iterdir())


def _prune(root: Path, keep_last: int) -> None:
    """Delete step directories beyond the newest `keep_last`, except those `last`, `best` (the link
    or the newest record) or a downstream artifact name."""
    protected = {_link_name(root / "last"), _link_name(root / "best"), _recorded_best(root)}
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    for _, p in steps[:-keep_last] if keep_last > 0 else []:
        if p.name not in protected and not is_used_downstream(p):
            shutil.rmtree(p, ignore_errors=True)


def record_use(ckpt: str | Path, user: str | Path, what: str, weights_sha256: str | None,
               progress: ProgressFn | None = None) -> None:
    """Note in `ckpt/.uvq-used-by/` that `user` (e.g. a latents directory) was made with its weights.

    Pruning keeps such checkpoints, so a prior's tokenizer is never deleted by a later resume of
    the VQGAN run. One file per user (named by its path's hash), so concurrent writers never
    collide. A checkpoint that cannot be written to (read-only storage) is left as it is, with a warning.
    """
    user = Path(user).resolve()
    record = {"path": str(user), "what": what, "weights_sha256": weights_sha256,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        atomic_write_json(Path(ckpt) / USED_BY / f"{sha256_bytes(str(user).encode())[:16]}.json", record)
    except OSError as exc:
        (progress or null_progress)({"event": "warn", "message": f"could not record in {ckpt} that {user} uses it "
                                     f"({exc.strerror}); a pruning run could delete it: keep a copy"})


# ---------------------------------------------------------------------------------------------
# The start of a resumed run: links checked or repaired, leftovers of killed writes removed
# ---------------------------------------------------------------------------------------------


def resume_checkpoint(run_dir: str | Path, kind: str | None = None, *, repair: bool = True) -> Path | None:
    """The checkpoint a resumed run continues from (None when the run has none yet).

    With `repair` (the writing rank), leftovers of killed writes (`.step-*.tmp`, `.last.*.lnk`)
    are removed, a missing `last` (killed between the checkpoint's rename and the link) is
    pointed at the newest complete checkpoint, and `best` is pointed where the newest
    checkpoint's record says (killed between writing a better checkpoint and moving the link).
    A `last` that dangles or names anything but a step directory of this run is refused: the
    checkpoint it named was removed, and starting again from step 0 would lose the run.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    if repair:
        for p in root.iterdir():
            if _STALE.match(p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
    complete = _complete_steps(root)
    name = _link_name(root / "last")
    newest = f" (the newest complete checkpoint is {complete[-1][1].name})" if complete else ""
    if name is None:
        if (root / "last").exists():
            raise UserError(f"{root / 'last'} is not a symlink; remove it, then point it at a checkpoint with "
                            f"`ln -s step-XXXXXXXX {root / 'last'}`{newest}")
        if not complete:
            return None
        name = complete[-1][1].name
        if repair:
            replace_symlink(root / "last", name)
    elif not _STEP_DIR.match(name) or not (root / name / "meta.json").is_file():
        fix = (f"point it at the newest complete one with `ln -sfn {complete[-1][1].name} {root / 'last'}`, then resume"
               if complete else "no complete checkpoint is left: start again with --overwrite")
        raise UserError(f"{root / 'last'} points at {name}, which is not a complete checkpoint of this run; "
                        f"nothing was changed: {fix}")
    ckpt = (root / name).resolve()
    found = read_meta(ckpt).get("kind")
    if kind is not None and found != kind:
        raise UserError(f"{root / 'last'} points at a {found} checkpoint, but {run_dir} is a {kind} run; "
                        f"point it at one of this run's own checkpoints (`ln -sfn step-XXXXXXXX {root / 'last'}`)")
    best = _recorded_best(root)
    if repair and best is not None and (root / best / "meta.json").is_file() and _link_name(root / "best") != best:
        replace_symlink(root / "best", best)
    return ckpt


# ---------------------------------------------------------------------------------------------
# Reading, verified (docs/reliability.md, "Integrity")
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


def _damaged(f: Path, problem: str) -> UserError:
    return UserError(f"{f} {problem}; the checkpoint is damaged or was altered: restore it from a copy, "
                     "or re-create it (train, encode or import again)")


def read_meta(path: str | Path, *, allow_unverified: bool = False) -> dict[str, Any]:
    """A checkpoint's meta.json, checked to be an object with the fields every reader relies on."""
    ckpt = resolve_checkpoint(path)
    f = ckpt / "meta.json"
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{f} is corrupt ({exc}); the checkpoint cannot be used") from exc
    if not isinstance(meta, dict):
        raise _damaged(f, f"holds a JSON {type(meta).__name__}, not an object")
    if meta.get("kind") not in KINDS:
        raise _damaged(f, f"has kind {meta.get('kind')!r}; it must be one of {', '.join(KINDS)}")
    if not isinstance(meta.get("model_config"), dict):
        raise _damaged(f, "has no model_config object")
    if meta.get("default_weights") not in WEIGHT_FILES:
        raise _damaged(f, f"has default_weights {meta.get('default_weights')!r}; it must be model or ema")
    shas = meta.get("weights_sha256")
    if not isinstance(shas, dict) or not shas or not all(w in WEIGHT_FILES and isinstance(s, str) for w, s in shas.items()):
        raise _damaged(f, "has no weights_sha256 record ({\"model\"|\"ema\": sha256}), so its weights cannot be checked")
    if not isinstance(meta.get("step", 0), int) or isinstance(meta.get("step", 0), bool):
        raise _damaged(f, f"has step {meta.get('step')!r}; it must be an integer")
    if (ckpt / UNVERIFIED).exists() and not allow_unverified:
        raise UserError(f"{ckpt} is an import that was stopped before its verification finished; run the same "
                        "`uvq import` again with --overwrite")
    meta["path"] = str(ckpt)
    return meta


def mark_verified(ckpt: str | Path) -> None:
    """Remove the UNVERIFIED marker once an import's verification has passed."""
    (Path(ckpt) / UNVERIFIED).unlink(missing_ok=True)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, streamed, computed once per process for each (path, size, mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def _verify_sha(f: Path, want: str | None) -> None:
    if not f.is_file():
        raise _damaged(f, "is missing (meta.json lists it)")
    if not want:
        raise _damaged(f, "has no sha256 in meta.json, so it cannot be checked")
    got = file_sha256(f)
    if got != want:
        raise _damaged(f, f"does not match the sha256 recorded in meta.json (file {got[:12]}, recorded {want[:12]})")


def _weights_path(meta: dict[str, Any], weights: str) -> Path:
    which = meta["default_weights"] if weights == "default" else weights
    if which not in WEIGHT_FILES:
        raise UserError(f"weights must be default, ema or model, not {weights!r}")
    f = Path(meta["path"]) / WEIGHT_FILES[which]
    if not f.is_file():
        raise UserError(f"checkpoint {meta['path']} has no {which} weights ({f.name}); "
                        f"choose --weights {'model' if which == 'ema' else 'ema'}")
    return f


def weights_file(path: str | Path, weights: str = "default") -> Path:
    return _weights_path(read_meta(path), weights)


def _load_verified(f: Path, want_sha: str | None,
                   expected: dict[str, tuple[tuple[int, ...], torch.dtype]] | None) -> dict[str, torch.Tensor]:
    """Load a weight file after its sha256 check; then its tensors against `expected`, and finiteness."""
    _verify_sha(f, want_sha)
    try:
        sd = load_file(str(f))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{f} is not a readable safetensors file ({exc}); the checkpoint is damaged") from exc
    if expected is not None:
        missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        if missing or extra:
            raise _damaged(f, f"does not hold the tensors of its architecture: missing {missing[:4]}, unexpected {extra[:4]}")
        for name, (shape, dtype) in expected.items():
            t = sd[name]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise _damaged(f, f"holds {name} as {str(t.dtype).replace('torch.', '')} {list(t.shape)}, but its "
                                  f"architecture has {str(dtype).replace('torch.', '')} {list(shape)}")
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _damaged(f, f"holds NaN or infinite values in {name}")
    return sd


def load_state_dict(path: str | Path, weights: str = "default", *, allow_unverified: bool = False,
                    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint's weights (safetensors, sha256-verified, finite) and its meta.

    `expected` (name -> (shape, dtype), see `expected_tensors`) also checks the tensors.
    """
    meta = read_meta(path, allow_unverified=allow_unverified)
    which = meta["default_weights"] if weights == "default" else weights
    f = _weights_path(meta, weights)
    sd = _load_verified(f, meta["weights_sha256"].get(which), expected)
    meta["weights_path"] = str(f)
    return sd, meta


def _model_section(kind: str, model_config: dict[str, Any]):
    from uvq.config import PriorConfig, VQGANConfig, section_from_dict

    if kind == "vqgan":
        return section_from_dict(VQGANConfig, model_config, "model.vqgan")
    return section_from_dict(PriorConfig, model_config, "model.prior")


def expected_tensors(kind: str, model_config: dict[str, Any], where: str = "meta.json"
                     ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The state dict a checkpoint of this architecture must hold: name -> (shape, dtype).

    The config is checked first: its block counts and sizes must be plausible (MAX_BLOCKS,
    MAX_IMG_SIZE, MAX_TOKENS), so that building the model to count it is cheap. The model is then
    built on the meta device (no memory, no initialisation, no random numbers drawn) and its
    parameter count must stay under MAX_PARAMETERS, before a real model is ever allocated.
    """
    try:
        cfg = _model_section(kind, model_config)
    except UserError as exc:
        raise UserError(f"{where}: its model_config is not a valid {kind} architecture ({exc})") from None
    if kind == "vqgan":
        blocks = len(cfg.ch_mult) * (cfg.res_blocks + cfg.decoder_res_blocks)
        too_big = [f"img_size {cfg.img_size} > {MAX_IMG_SIZE}"] * (cfg.img_size > MAX_IMG_SIZE)
    else:
        blocks = cfg.n_layer
        too_big = [f"{cfg.n_tokens} tokens > {MAX_TOKENS}"] * (cfg.n_tokens > MAX_TOKENS)
    too_big += [f"{blocks} blocks > {MAX_BLOCKS}"] * (blocks > MAX_BLOCKS)
    if not too_big:
        with torch.device("meta"):
            model = build_model(kind, model_config)
        sd = model.state_dict()
        n = sum(t.numel() for t in sd.values())
        too_big += [f"{n:,} parameters > {MAX_PARAMETERS:,}"] * (n > MAX_PARAMETERS)
    if too_big:
        raise UserError(f"{where} describes an implausibly large {kind} ({'; '.join(too_big)}); it was not built: "
                        "the checkpoint is damaged or hostile (the limits are in docs/reliability.md)")
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def load_model(path: str | Path, kind: str, *, weights: str = "default", device: str | torch.device = "cpu",
               allow_unverified: bool = False):
    """Rebuild the module from the embedded config (through the registry) and load its verified weights strictly."""
    meta = read_meta(path, allow_unverified=allow_unverified)
    if meta["kind"] != kind:
        raise UserError(f"{meta['path']} is a {meta['kind']} checkpoint, but a {kind} checkpoint is needed here")
    expected = expected_tensors(kind, meta["model_config"], str(Path(meta["path"]) / "meta.json"))
    sd, meta = load_state_dict(meta["path"], weights, allow_unverified=allow_unverified, expected=expected)
    model = build_model(kind, meta["model_config"])
    model.load_state_dict(sd, strict=True)
    meta["weights_sha256"] = meta["weights_sha256"][meta["default_weights"] if weights == "default" else weights]
    return model.to(device).eval(), meta


def build_model(kind: str, model_config: dict[str, Any]) -> torch.nn.Module:
    """Build a VQGAN or prior from a config dict (a checkpoint's `model_config`)."""
    from uvq.registry import registry

    cfg = _model_section(kind, model_config)
    if kind == "vqgan":
        from uvq.vqgan.model import build_vqgan

        return build_vqgan(cfg)
    return registry.get("priors", cfg.name)(cfg)


def verify_checkpoint(ckpt_dir: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Check a whole checkpoint before a resume trusts it: meta, architecture, every weight file, trainer.pt."""
    meta = read_meta(ckpt_dir)
    if kind is not None and meta["kind"] != kind:
        raise UserError(f"{meta['path']} is a {meta['kind']} checkpoint, but a {kind} checkpoint is needed here")
    expected = expected_tensors(meta["kind"], meta["model_config"], str(Path(meta["path"]) / "meta.json"))
    for which, sha in meta["weights_sha256"].items():
        _load_verified(Path(meta["path"]) / WEIGHT_FILES[which], sha, expected)
    if "trainer_sha256" in meta:  # recorded since uvq's integrity checks; older checkpoints have none
        _verify_sha(Path(meta["path"]) / TRAINER_FILE, meta["trainer_sha256"])
    return meta


def load_trainer_state(ckpt_dir: str | Path) -> dict[str, Any]:
    f = Path(ckpt_dir) / TRAINER_FILE
    if not f.is_file():
        raise UserError(f"{ckpt_dir} has no trainer.pt; it cannot be resumed (it may be an imported or exported checkpoint)")
    meta = verify_checkpoint(ckpt_dir)
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{f} cannot be loaded safely ({type(exc).__name__}); the checkpoint is damaged") from exc
    got = state.get("step") if isinstance(state, dict) else None
    if got != meta["step"]:
        raise _damaged(f, f"is not this checkpoint's trainer state (its step is {got!r}, meta.json says {meta['step']})")
    return state


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
            raise UserError(f"run directory {run} does not exist; give --run-dir a pipeline or fit-prior run directory")
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
                        f"run `uvq pipeline {recipe}` first, or pass --prior / --run-dir")
    here = Path(cwd or Path.cwd())
    for cand in (here, here.parent):
        if (found := _prior_in(cand)) is not None:
            return found, f"the current directory ({cand})"
    raise UserError("no prior checkpoint given and none in the current directory; pass --prior CKPT, "
                    "--run-dir DIR or --recipe NAME")


def find_vqgan(prior_meta: dict[str, Any], vqgan: str | Path | None = None, *, allow_other_vqgan: bool = False,
               progress: ProgressFn | None = None) -> tuple[Path, str, str]:
    """The VQGAN that decodes a prior's codes: (checkpoint, weights, where it was found).

    Without `vqgan`, the prior's provenance names the tokenizer that wrote its training latents
    (its path and weight hash). When that path has moved, the VQGAN stage beside the prior's run
    (a pipeline run's vqgan/) is searched for a checkpoint with the same weight hash. A `vqgan`
    given by hand must have those weights too (a prior decodes to noise through another
    codebook), unless `allow_other_vqgan`, which warns.
    """
    tok = (prior_meta.get("provenance") or {}).get("tokenizer")
    tok = tok if isinstance(tok, dict) else None
    weights = (tok or {}).get("weights") or "default"
    want = (tok or {}).get("sha256")
    if vqgan is not None:
        ckpt = resolve_checkpoint(vqgan)
        meta = read_meta(ckpt)
        if meta["kind"] != "vqgan":
            raise UserError(f"--vqgan {vqgan} is a {meta['kind']} checkpoint, not a VQGAN")
        if want is None or _weights_sha(meta, weights) == want:
            return ckpt, weights if want else "default", f"--vqgan {vqgan}"
        message = (f"--vqgan {vqgan} has other weights ({str(_weights_sha(meta, weights))[:12]}) than the VQGAN prior "
                   f"{prior_meta['path']} was trained with ({want[:12]}, {tok.get('path')})")
        if not allow_other_vqgan:
            raise UserError(f"{message}; its samples would decode to noise: drop --vqgan to use the prior's own, or "
                            "set allow_other_vqgan=true in the command's section (e.g. sample.allow_other_vqgan=true) to decode with it anyway")
        (progress or null_progress)({"event": "warn", "message": f"{message}; decoding with it as asked"})
        return ckpt, "default", f"--vqgan {vqgan} (not the prior's tokenizer)"
    if not tok:
        raise UserError(f"prior {prior_meta['path']} was trained on latents without a tokenizer record, so its "
                        "VQGAN is unknown; pass --vqgan CKPT")
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


def resolve_pair(prior_meta: dict[str, Any], vqgan: str | Path | None, *, allow_other_vqgan: bool = False,
                 progress: ProgressFn | None = None) -> tuple[dict[str, Any], str]:
    """The VQGAN that decodes a prior's tokens (its provenance, or `vqgan`), checked to fit: (meta, weights).

    A `vqgan` whose weights are not the prior's tokenizer is refused unless `allow_other_vqgan` (see `find_vqgan`).
    """
    if vqgan is not None and (given := read_meta(vqgan))["kind"] == "vqgan":
        check_pair(prior_meta, given)  # a shape mismatch says more than a weights mismatch
    vq_path, vq_weights, _ = find_vqgan(prior_meta, vqgan, allow_other_vqgan=allow_other_vqgan, progress=progress)
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
              device: str | torch.device = "auto", decoder: bool = True, allow_other_vqgan: bool = False) -> Pair:
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
        vq_meta, vq_weights = resolve_pair(prior_meta, vqgan, allow_other_vqgan=allow_other_vqgan)
    net, prior_meta = load_model(prior, "prior", weights=weights, device=dev)
    if vq_meta is not None:
        vq_model, vq_meta = load_model(vq_meta["path"], "vqgan", weights=vq_weights, device=dev)
        vq_weights = vq_meta["default_weights"] if vq_weights == "default" else vq_weights
    return Pair(net, prior_meta, vq_model, vq_meta, vq_weights)
