"""Latent shards: the VQGAN's code grids on disk, the input of stage two (docs/method.md section 2).

The prior never sees pixels. `encode_dataset` runs the VQGAN's encoder and quantizer once over
a dataset and stores each image's code grid z in {0..K-1}^{h x w}; `fit-prior` and `eval elbo`
read them back. The format is plain webdataset tar shards plus a JSON manifest, so that any
tool can write token grids for uvq (docs/latents.md is the format's reference):

    latents/ffhq/
      manifest.json          codebook_size, latent_shape, num_samples, tokenizer, shards, ...
      encode.json            the settings an unfinished encode was started with (resume check)
      latents-000000.tar     train split: members "<key>.codes.npy", uint16 [h, w]
      latents-000001.tar
      val-000000.tar         held-out split (the data source's deterministic split by key)

Caches are keyed by content (style.md, principle 10): the manifest names the sha256 of the VQGAN
weights that made the codes, and `check_tokenizer` refuses shards from a different one. The
authors' code names its token cache after the dataset, so stale tokens are silently reused.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uvq import __version__
from uvq.data.sources import unsafe_member
from uvq.errors import Stopped
from uvq.files import atomic_write_json, check_out_dir, claim_out_dir, disk_error, sha256_file
from uvq.progress import ProgressFn, null_progress
from uvq.runtime import UserError, barrier, dist_info
from uvq.stopping import StopRequest

FORMAT = "uvq-latents"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
SHARD_PREFIX = {"train": "latents", "val": "val"}
SHARD_NAME = re.compile(r"^(latents|val)-(\d{6})\.tar$")  # `.tmp` files never match
CODES_MEMBER = ".codes.npy"
FLIP_SUFFIX = ".flip"  # key of a horizontally flipped copy: "<key>.flip"
MANIFEST = "manifest.json"
ENCODE_STATE = "encode.json"


def shard_name(split: str, index: int) -> str:
    """`latents-%06d.tar` for the train split, `val-%06d.tar` for the validation split."""
    return f"{SHARD_PREFIX[split]}-{index:06d}.tar"


def list_shards(root: str | Path) -> dict[str, list[Path]]:
    """Finished shards in `root` by split, in index order (temporary `.tmp` files are ignored)."""
    found: dict[str, list[tuple[int, Path]]] = {s: [] for s in SPLITS}
    for p in Path(root).iterdir():
        if (m := SHARD_NAME.match(p.name)) and p.is_file():
            found["train" if m.group(1) == "latents" else "val"].append((int(m.group(2)), p))
    return {s: [p for _, p in sorted(v)] for s, v in found.items()}


# ---------------------------------------------------------------------------------------------
# Shard files: tar members "<key>.codes.npy" (webdataset layout), written atomically
# ---------------------------------------------------------------------------------------------


def _npy_bytes(codes: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, codes, allow_pickle=False)
    return buf.getvalue()


KEY_MEMBER = ".key.txt"  # the original key of a sample stored under a hashed name


def member_name(key: str) -> str:
    """The tar name a sample's members are stored under: the key itself when it is a safe name
    that fits a ustar header, else "hashed-<sha256 of the key>" (the key then goes in a KEY_MEMBER).

    A ustar name holds at most 100 bytes (255 split at a '/'), so a long file name or shard key
    would make tarfile raise mid-shard; a key that leaves the archive's folder ('..', an absolute
    path; uvq.data.sources.unsafe_member) is never written as a name.
    """
    info = tarfile.TarInfo(key + CODES_MEMBER)
    try:
        info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        fits = True
    except ValueError:  # "name is too long"
        fits = False
    if fits and not unsafe_member(key) and not key.startswith("hashed-"):
        return key
    return "hashed-" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class ShardWriter:
    """Writes one shard to `<name>.tmp` and renames it to `<name>` on `close()`.

    A killed process leaves only the `.tmp` file, which no reader accepts (SHARD_NAME) and the
    next run truncates. Members carry mtime 0 so that the same codes give the same bytes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self._tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        except OSError as exc:  # a full disk or a read-only folder is the user's to fix (one line)
            raise disk_error(exc, self.tmp) from exc
        self.count = 0

    def write(self, key: str, codes: np.ndarray) -> None:
        if codes.dtype != np.uint16:
            raise ValueError(f"codes must be uint16, got {codes.dtype}")
        name = member_name(key)
        if name != key:  # the original key travels in the sample, just before its codes
            self._add(name + KEY_MEMBER, key.encode("utf-8", "surrogateescape"))
        self._add(name + CODES_MEMBER, _npy_bytes(codes))
        self.count += 1

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        try:
            self._tar.addfile(info, io.BytesIO(data))
        except OSError as exc:
            raise disk_error(exc, self.tmp) from exc

    def close(self) -> None:
        try:
            self._tar.close()
            with open(self.tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise disk_error(exc, self.tmp) from exc

    def abort(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)


def write_shard(path: str | Path, items: Sequence[tuple[str, np.ndarray]]) -> Path:
    """Write `(key, uint16 codes [h, w])` pairs as one finished shard."""
    writer = ShardWriter(path)
    try:
        for key, codes in items:
            writer.write(key, np.asarray(codes, dtype=np.uint16))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return Path(path)


def read_shard(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(key, codes)` in file order. The key is the member name minus `.codes.npy`, so keys
    may contain dots; members with other extensions (a webdataset sample's other fields) are skipped."""
    try:
        with tarfile.open(path, "r:") as tar:
            original: dict[str, str] = {}  # hashed member name -> the key it stands for
            for info in tar:
                if info.isfile() and info.name.endswith(KEY_MEMBER):
                    original[info.name[: -len(KEY_MEMBER)]] = tar.extractfile(info).read().decode("utf-8", "surrogateescape")
                    continue
                if not info.isfile() or not info.name.endswith(CODES_MEMBER):
                    continue
                data = tar.extractfile(info).read()
                try:
                    codes = np.load(io.BytesIO(data), allow_pickle=False)
                except ValueError as exc:
                    raise UserError(f"{path}: member {info.name} is not a numpy .npy array ({exc}); "
                                    "the shard is damaged: delete it and re-run `uvq encode`") from exc
                name = info.name[: -len(CODES_MEMBER)]
                yield original.pop(name, name), codes
    except tarfile.TarError as exc:
        raise UserError(f"{path} is not a readable tar shard ({exc}); delete it and re-run `uvq encode`") from exc


def count_shard(path: str | Path) -> int:
    """Samples in a shard, from the tar headers alone."""
    try:
        with tarfile.open(path, "r:") as tar:
            return sum(1 for info in tar if info.isfile() and info.name.endswith(CODES_MEMBER))
    except tarfile.TarError as exc:
        raise UserError(f"{path} is not a readable tar shard ({exc}); delete it and re-run `uvq encode`") from exc


# ---------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------


def tokenizer_record(vqgan_meta: dict[str, Any], weights: str) -> dict[str, Any]:
    """What the manifest says about the VQGAN that made the codes (from `load_model`'s meta)."""
    return {
        "sha256": vqgan_meta["weights_sha256"],
        "path": vqgan_meta.get("path"),
        "weights": weights,
        "step": vqgan_meta.get("step"),
        "model_config": vqgan_meta.get("model_config"),
    }


def _manifest_error(root: Path, problem: str) -> UserError:
    return UserError(f"{root / MANIFEST} {problem}; re-run `uvq encode` into {root}, or fix the file "
                     "as described in docs/latents.md")


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Load and check `root/manifest.json`. Shards listed there must exist.

    An external tool may leave out `shards` and `num_samples`: the shards are then found by
    name (`latents-%06d.tar`, `val-%06d.tar`) and counted.
    """
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise UserError(f"latents directory {root} does not exist; write it with `uvq encode --out {root}`")
    if not path.is_file():
        hint = (" (an encode was started here but has not finished: re-run the same `uvq encode` to finish it)"
                if (root / ENCODE_STATE).is_file() else "")
        raise UserError(f"{root} has no {MANIFEST}{hint}; write latents with `uvq encode`, see docs/latents.md")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _manifest_error(root, f"is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise _manifest_error(root, "must hold a JSON object")
    for key in ("codebook_size", "latent_shape", "tokenizer"):
        if key not in manifest:
            raise _manifest_error(root, f"lacks the field {key!r}")
    k, shape = manifest["codebook_size"], manifest["latent_shape"]
    if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= 65536:
        raise _manifest_error(root, f"has codebook_size {k!r}; it must be an integer in [2, 65536] (uint16 codes)")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise _manifest_error(root, f"has latent_shape {shape!r}; it must be [h, w] with positive integers")
    if manifest["tokenizer"] is not None and not isinstance(manifest["tokenizer"], dict):
        raise _manifest_error(root, "has a tokenizer that is neither an object nor null")
    if "shards" not in manifest:
        found = list_shards(root)
        manifest["shards"] = [{"name": p.name, "split": s, "num_samples": count_shard(p)}
                              for s in SPLITS for p in found[s]]
    shards = manifest["shards"]
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and s.get("split") in SPLITS for s in shards):
        raise _manifest_error(root, "has a malformed shards list (each entry needs name and split train|val)")
    for s in shards:
        if not (root / s["name"]).is_file():
            raise UserError(f"shard {s['name']} listed in {path} is missing; re-run `uvq encode` into {root} "
                            "to write it again")
        if "num_samples" not in s:
            s["num_samples"] = count_shard(root / s["name"])
    counts = {sp: sum(s["num_samples"] for s in shards if s["split"] == sp) for sp in SPLITS}
    manifest.setdefault("num_samples", counts)
    manifest["root"] = str(root)
    return manifest


def check_tokenizer(manifest: dict[str, Any], vqgan_sha256: str | None = None, codebook_size: int | None = None,
                    latent_shape: Sequence[int] | None = None, *, against: str = "the model") -> None:
    """Refuse latents that do not belong to the expected VQGAN / prior.

    Each given field is compared; the first mismatch raises a UserError naming the field, both
    values, and why it matters. `against` names what the values came from (a checkpoint path, the
    recipe's model.prior, ...).
    """
    where = manifest.get("root", "the latents")
    tok = manifest.get("tokenizer")
    if vqgan_sha256 is not None:
        if tok is None:
            raise UserError(f"latents {where} were written without a tokenizer (tokenizer: null), so they cannot "
                            f"be checked against {against}; drop the VQGAN (--vqgan / prior_train.vqgan) to train on "
                            "them as plain token grids, or re-encode them with `uvq encode`")
        if tok.get("sha256") != vqgan_sha256:
            raise UserError(f"tokenizer sha256 differs: latents {where} were encoded by VQGAN weights "
                            f"{str(tok.get('sha256'))[:12]} ({tok.get('path')}), but {against} has weights "
                            f"{vqgan_sha256[:12]}; a prior trained on one VQGAN's codes decodes to noise with another: "
                            f"re-encode with `uvq encode --vqgan` of that checkpoint, or name the VQGAN that made them")
    if codebook_size is not None and int(manifest["codebook_size"]) != int(codebook_size):
        raise UserError(f"codebook_size differs: latents {where} hold codes from a codebook of {manifest['codebook_size']} "
                        f"entries, but {against} has {codebook_size}; the prior's token embedding and output head are "
                        "sized by it: set model.prior.codebook_size to match, or re-encode")
    if latent_shape is not None and list(manifest["latent_shape"]) != [int(s) for s in latent_shape]:
        raise UserError(f"latent_shape differs: latents {where} are grids of {list(manifest['latent_shape'])}, but "
                        f"{against} expects {[int(s) for s in latent_shape]}; the prior's positional embedding "
                        "has one entry per position: set model.prior.latent_shape to match, or re-encode")


def _write_manifest(root: Path, *, codebook_size: int, latent_shape: Sequence[int], tokenizer: dict[str, Any] | None,
                    transform: dict[str, Any], data: dict[str, Any] | None = None) -> dict[str, Any]:
    shards = [{"name": p.name, "split": s, "num_samples": count_shard(p), "sha256": sha256_file(p)}
              for s, paths in list_shards(root).items() for p in paths]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "codebook_size": int(codebook_size),
        "latent_shape": [int(s) for s in latent_shape],
        "dtype": "uint16",
        "num_samples": {sp: sum(s["num_samples"] for s in shards if s["split"] == sp) for sp in SPLITS},
        "tokenizer": tokenizer,
        "transform": transform,
        "data": data,
        "uvq_version": __version__,
        "shards": shards,
    }
    atomic_write_json(root / MANIFEST, manifest)
    return manifest


def write_latents(root: str | Path, splits: dict[str, Sequence[tuple[str, np.ndarray]]], *, codebook_size: int,
                  shard_size: int = 10_000, tokenizer: dict[str, Any] | None = None,
                  transform: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write token grids that did not come from `uvq encode` (tokenizer None: any token grids).

    `splits` maps "train" / "val" to `(key, codes [h, w])` pairs. Returns the manifest.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shape = None
    for split, items in splits.items():
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        items = list(items)
        for i in range(math.ceil(len(items) / shard_size)):
            chunk = items[i * shard_size:(i + 1) * shard_size]
            for key, codes in chunk:
                codes = np.asarray(codes)
                shape = shape or list(codes.shape)
                if list(codes.shape) != shape or codes.min() < 0 or codes.max() >= codebook_size:
                    raise ValueError(f"sample {key}: codes must all be [h, w] = {shape} with values in [0, {codebook_size})")
            write_shard(root / shard_name(split, i), chunk)
    if shape is None:
        raise ValueError("no samples to write")
    return _write_manifest(root, codebook_size=codebook_size, latent_shape=shape, tokenizer=tokenizer,
                           transform=transform or {})


# ---------------------------------------------------------------------------------------------
# `uvq encode`: images -> codes, batched, resumable, one shard series per rank
# ---------------------------------------------------------------------------------------------


def check_recorded_source(source: str, where: str) -> str:
    """A data source read from a file (a checkpoint's saved config), refused unless plainly a location.

    webdataset opens `pipe:CMD` by running CMD in a shell, and other schemes (gs://, ais://, ...)
    by running a helper program. A value read from a checkpoint, manifest or run directory is
    never executed (docs/data.md, "pipe: sources"): only `demo`, local paths and http(s) URLs
    (fetched by curl given the URL as one argument, no shell) are taken from there. `pipe:`
    works where the user writes it: --data, a recipe, or a data.source= override.
    """
    from urllib.parse import urlparse

    from webdataset.shardlists import expand_urls

    for url in expand_urls(str(source)):  # a brace pattern can assemble "pipe:" from its parts
        scheme = urlparse(url).scheme
        if url.startswith("pipe:") or (scheme and scheme not in ("http", "https")):
            raise UserError(f"{where} records data.source {str(source)[:80]!r}, which would run a program; uvq never "
                            "runs a command read from a file: pass the data yourself with --data")
    return str(source)


def _check_encode_state(root: Path, state: dict[str, Any]) -> None:
    """A re-run must continue the same encode; otherwise its shards would mix two settings. Reads only."""
    path = root / ENCODE_STATE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        old = {}
    for key, value in state.items():
        if old.get(key) != value:
            raise UserError(f"{root} holds an encode started with {key}={old.get(key)!r}, but this run has "
                            f"{key}={value!r}; re-run with the same settings to finish it, or pass --overwrite to start over")


def encode_out_check(out_dir: str | Path, *, vqgan: str | Path | None, data_source: str | None,
                     overwrite: bool = False) -> None:
    """uvq.files.check_out_dir for encode (reads only): a re-run continues, --overwrite starts over,
    and the directory may not overlap the VQGAN or the images. The CLI calls it before loading."""
    check_out_dir(out_dir, command="encode", overwrite=overwrite, resume=not overwrite, inputs=(vqgan, data_source))


def encode_dataset(vqgan: torch.nn.Module, vqgan_meta: dict[str, Any], data_cfg, out_dir: str | Path, *,
                   batch_size: int = 32, shard_size: int = 10_000, flip_copies: bool = False,
                   weights: str = "default", device: str | torch.device = "cpu", overwrite: bool = False,
                   progress: ProgressFn | None = None, stop: StopRequest | None = None) -> dict[str, Any]:
    """Encode every image of `data_cfg`'s source to code grids in webdataset shards; return the manifest.

    Args:
        vqgan: a VQGAN (`encode_codes(x01) -> LongTensor[B, h, w]`), already on `device`.
        vqgan_meta: its checkpoint meta from `uvq.checkpoint.load_model` (sha256, path, model config).
        data_cfg: the recipe's `DataConfig`; the image size is the VQGAN's `img_size`.
        shard_size: source images per shard (a shard holds twice as many samples with flip copies).
        flip_copies: also store the codes of each horizontally flipped image, under "<key>.flip".
        weights: which weights of the checkpoint were loaded ("ema" / "model"), for the manifest.
        stop: the request to stop early (uvq.stopping). On a signal or the time limit each rank
            stops after its batch in progress and drops the shard it was writing (its `.tmp`): a
            shard of 10,000 images can outlast the grace SLURM gives after SIGTERM (KillWait, 30 s
            by default). The ranks then agree, no manifest is written, and uvq.errors.Stopped is
            raised; a re-run encodes only the missing shards.

    Shard j of a split holds the images j*shard_size .. (j+1)*shard_size-1 of this rank's
    deterministic pass over that split. Under torchrun rank r writes the global shard numbers
    j*world_size + r, so ranks never touch each other's files; rank 0 writes the manifest once
    all ranks have finished. A shard that exists is complete (it was renamed from `.tmp` when
    finished), so a re-run skips its images without encoding them.
    """
    from uvq.data.streams import iterate_images

    progress = progress or null_progress
    stop = stop if stop is not None else StopRequest()
    info = dist_info()
    root = Path(out_dir)
    device = torch.device(device)
    model_cfg = vqgan_meta["model_config"]
    img_size = int(model_cfg["img_size"])
    codebook_size = int(model_cfg["codebook_size"])
    if weights == "default":
        weights = vqgan_meta.get("default_weights", "model")
    tokenizer = tokenizer_record(vqgan_meta, weights)
    transform = {"img_size": img_size, "resize": "shorter side to img_size, then center crop (uvq.data.sources)",
                 "flip_copies": bool(flip_copies), "range": "[0, 1]"}
    data = {"source": str(data_cfg.source), "val_fraction": data_cfg.val_fraction, "max_images": data_cfg.max_images}
    state = {"tokenizer_sha256": tokenizer["sha256"], "img_size": img_size, "flip_copies": bool(flip_copies),
             "shard_size": int(shard_size), "world_size": info.world_size, **{f"data_{k}": v for k, v in data.items()}}

    # Rank 0 checks everything (a refused encode changes nothing), then claims and locks the
    # directory until the manifest is written; then all ranks start.
    claim = None
    if info.is_main:
        encode_out_check(root, vqgan=vqgan_meta.get("path"), data_source=data_cfg.source, overwrite=overwrite)
        if not overwrite:
            _check_encode_state(root, state)
        claim = claim_out_dir(root, command="encode", overwrite=overwrite, resume=not overwrite,
                              inputs=(vqgan_meta.get("path"), data_cfg.source), entries=(MANIFEST, ENCODE_STATE),
                              patterns=("latents-*.tar", "val-*.tar"))
        (root / MANIFEST).unlink(missing_ok=True)  # a manifest exists only for a finished encode
        if not (root / ENCODE_STATE).is_file():
            atomic_write_json(root / ENCODE_STATE, state)
    barrier()

    latent_shape = None
    totals = {"encoded": 0, "skipped": 0}
    t0 = time.time()
    stopping: str | None = None  # why this rank stops early, once it was asked to
    stop.watch()
    for split in SPLITS:
        task = f"encode {split}"
        images_pass = iterate_images(data_cfg, img_size, split=split, batch_size=batch_size,
                                     rank=info.rank, world_size=info.world_size, progress=progress)
        progress({"event": "start", "task": task, "total": getattr(images_pass, "total", None), "unit": "img"})
        writer: ShardWriter | None = None
        position = 0  # images seen by this rank in this split
        for batch in images_pass:
            keys, images = list(batch["key"]), batch["image"]
            # Which images fall into shards that still have to be written.
            todo = [i for i in range(len(keys))
                    if not (root / shard_name(split, ((position + i) // shard_size) * info.world_size + info.rank)).exists()]
            codes = flipped = None
            if todo:
                x = images[todo].to(device, non_blocking=True)
                with torch.inference_mode():  # fp32: bf16 could move a vector to another nearest code
                    codes = vqgan.encode_codes(x).to("cpu", torch.int64).numpy()  # [b, h, w]
                    if flip_copies:
                        flipped = vqgan.encode_codes(x.flip(-1)).to("cpu", torch.int64).numpy()
                latent_shape = latent_shape or list(codes.shape[1:])
            for j, i in enumerate(todo):
                local = (position + i) // shard_size
                if writer is not None and writer.path.name != shard_name(split, local * info.world_size + info.rank):
                    writer.close()
                    writer = None
                if writer is None:
                    writer = ShardWriter(root / shard_name(split, local * info.world_size + info.rank))
                writer.write(keys[i], codes[j].astype(np.uint16))
                if flipped is not None:
                    writer.write(keys[i] + FLIP_SUFFIX, flipped[j].astype(np.uint16))
            position += len(keys)
            totals["encoded"] += len(todo)
            totals["skipped"] += len(keys) - len(todo)
            elapsed = max(time.time() - t0, 1e-9)
            progress({"event": "advance", "task": task, "n": len(keys),
                      "metrics": {"encoded": totals["encoded"], "skipped": totals["skipped"],
                                  "img_per_s": round(totals["encoded"] / elapsed, 1)}})
            # A shard is finished as soon as this rank's pass has moved beyond it.
            if writer is not None and position % shard_size == 0:
                writer.close()
                writer = None
            # Asked to stop: drop the unfinished shard and leave (each rank on its own).
            stopping = stopping or stop.should_stop()
            if stopping is not None:
                if writer is not None:
                    writer.abort()
                    writer = None
                break
        if writer is not None:
            writer.close()
        stats = getattr(images_pass, "stats", None)
        totals["bad_images"] = totals.get("bad_images", 0) + int(getattr(stats, "skipped", 0) or 0)
        progress({"event": "end", "task": task, "metrics": dict(totals)})
        if stopping is not None:
            break

    # Every rank meets here, finished or stopped; under torchrun one all-reduce says whether any stopped.
    reason = stop.should_stop(info, device) if info.enabled else stopping
    if reason is not None:
        if claim is not None:
            claim.release()
        raise Stopped(reason, f"the finished shards are kept in {root} (a re-run encodes the rest)", out=root)
    manifest: dict[str, Any] = {}
    if info.is_main:
        found = list_shards(root)
        if not found["train"] and not found["val"]:
            raise UserError(f"no images were read from data source {data_cfg.source!r}; check that it holds readable images")
        if latent_shape is None:  # every shard was already complete: read the shape back
            _, first = next(read_shard((found["train"] or found["val"])[0]))
            latent_shape = list(first.shape)
        manifest = _write_manifest(root, codebook_size=codebook_size, latent_shape=latent_shape,
                                   tokenizer=tokenizer, transform=transform, data=data)
        manifest["seconds"] = round(time.time() - t0, 2)
        manifest["encoded"], manifest["skipped"] = totals["encoded"], totals["skipped"]
        manifest["bad_images"] = totals.get("bad_images", 0)
        if vqgan_meta.get("path"):  # pruning the VQGAN's run keeps these weights (uvq.checkpoint.record_use)
            from uvq.checkpoint import record_use

            record_use(vqgan_meta["path"], root, "latents", tokenizer["sha256"], progress)
    if claim is not None:
        claim.release()
    barrier()
    if not info.is_main:
        manifest = read_manifest(root)
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading for training: shuffled, split across ranks and workers, infinite, resumable
# ---------------------------------------------------------------------------------------------


def _shards_of(manifest: dict[str, Any], split: str) -> list[tuple[Path, int]]:
    root = Path(manifest["root"])
    return [(root / s["name"], int(s["num_samples"])) for s in manifest["shards"] if s["split"] == split]


def load_codes(manifest: dict[str, Any], path: Path) -> tuple[list[str], np.ndarray]:
    """A whole shard as keys and an int64 array [n, h, w], checked against the manifest."""
    keys, arrays = [], []
    shape = tuple(manifest["latent_shape"])
    for key, codes in read_shard(path):
        if codes.shape != shape or not np.issubdtype(codes.dtype, np.integer):
            raise UserError(f"{path}: sample {key} has codes of shape {codes.shape} and dtype {codes.dtype}, but the "
                            f"manifest says latent_shape {list(shape)} of integers; the shard does not belong here")
        keys.append(key)
        arrays.append(codes)
    if not arrays:
        return [], np.zeros((0, *shape), dtype=np.int64)
    stacked = np.stack(arrays).astype(np.int64)
    if stacked.min() < 0 or stacked.max() >= manifest["codebook_size"]:
        raise UserError(f"{path} holds codes outside [0, {manifest['codebook_size']}) (the manifest's codebook_size); "
                        "the shard does not belong to this manifest")
    return keys, stacked


class LatentStream(torch.utils.data.IterableDataset):
    """Endless shuffled batches of code grids, LongTensor[B, h, w] (or [B, N] with `flatten`).

    Each epoch permutes the shard list with (seed, epoch); consecutive `buffer_shards` shards form
    a group whose samples are permuted with (seed, epoch, group). Rank r of W (and DataLoader
    worker w of n inside it) keeps every (W*n)-th sample of that order, so every rank sees a
    disjoint share, in the same number of batches. The order is a pure function of the seed, so
    the position `(epoch, group, offset)` resumes it exactly (`state_dict` / `load_state_dict`).
    Reading uint16 grids costs microseconds, so the training loop iterates in-process; inside a
    DataLoader each worker takes its own share (then the position is not tracked).
    """

    def __init__(self, manifest: dict[str, Any], *, split: str = "train", batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, buffer_shards: int = 4, flatten: bool = False) -> None:
        super().__init__()
        self.manifest, self.split, self.batch_size = manifest, split, int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.buffer_shards, self.flatten = max(1, int(buffer_shards)), flatten
        self.shards = _shards_of(manifest, split)
        total = sum(n for _, n in self.shards)
        if total < world_size:
            raise UserError(f"latents {manifest.get('root')} have {total} {split} samples, fewer than the "
                            f"{world_size} processes; encode more data")
        self.epoch, self.group, self.offset = 0, 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "group": self.group, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.group, self.offset = int(state["epoch"]), int(state["group"]), int(state["offset"])

    def _order(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.shards), generator=g).tolist()
        return [perm[i:i + self.buffer_shards] for i in range(0, len(perm), self.buffer_shards)]

    def _group_codes(self, epoch: int, group: list[int], gi: int, stride: int, start: int) -> np.ndarray:
        codes = np.concatenate([load_codes(self.manifest, self.shards[i][0])[1] for i in group])
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 7919 + gi)
        perm = torch.randperm(len(codes), generator=g).numpy()
        return codes[perm[start::stride]]  # [n_mine, h, w]

    def samples(self) -> Iterator[np.ndarray]:
        """This process's endless sample sequence, advancing the position as it goes."""
        worker = torch.utils.data.get_worker_info()
        n_workers, wid = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        stride, start = self.world_size * n_workers, self.rank * n_workers + wid
        while True:
            groups = self._order(self.epoch)
            while self.group < len(groups):
                mine = self._group_codes(self.epoch, groups[self.group], self.group, stride, start)
                while self.offset < len(mine):
                    self.offset += 1
                    yield mine[self.offset - 1]
                self.group, self.offset = self.group + 1, 0
            self.epoch, self.group = self.epoch + 1, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        it = self.samples()
        while True:
            batch = torch.from_numpy(np.stack([next(it) for _ in range(self.batch_size)]))  # [B, h, w]
            yield batch.flatten(1) if self.flatten else batch  # [B, N]


def iterate_latents(manifest: dict[str, Any], split: str = "val", *, batch_size: int = 64, rank: int = 0,
                    world_size: int = 1, max_samples: int | None = None) -> Iterator[dict[str, Any]]:
    """One ordered pass over a split: {"key": list[str], "codes": LongTensor[B, h, w]}.

    Samples are numbered in shard order; rank r of W takes numbers r, r+W, ... (evaluation).
    """
    pending_keys: list[str] = []
    pending: list[np.ndarray] = []
    index = 0
    for path, _ in _shards_of(manifest, split):
        keys, codes = load_codes(manifest, path)
        for key, c in zip(keys, codes, strict=True):
            if max_samples is not None and index >= max_samples:
                break
            if index % world_size == rank:
                pending_keys.append(key)
                pending.append(c)
            index += 1
            if len(pending) == batch_size:
                yield {"key": pending_keys, "codes": torch.from_numpy(np.stack(pending))}
                pending_keys, pending = [], []
    if pending:
        yield {"key": pending_keys, "codes": torch.from_numpy(np.stack(pending))}


def latents_stream(latents, *, split: str = "train", batch_size: int = 20, seed: int = 0, rank: int = 0,
                   world_size: int = 1, train: bool = True, flatten: bool = False):
    """A latents directory (a path, its manifest, or a DataConfig whose source is the directory) as
    batches: a `LatentStream` for training (train=True), or the ordered pass of `iterate_latents`."""
    if hasattr(latents, "source"):  # a DataConfig whose source is the latents directory
        latents = latents.source
    manifest = latents if isinstance(latents, dict) else read_manifest(latents)
    if split not in SPLITS:
        raise UserError(f"split must be train or val, not {split!r}")
    if not _shards_of(manifest, split):
        raise UserError(f"latents {manifest['root']} have no {split} shards; encode with a data.val_fraction > 0 "
                        "for a validation split")
    if train:
        return LatentStream(manifest, split=split, batch_size=batch_size, seed=seed, rank=rank,
                            world_size=world_size, flatten=flatten)
    return iterate_latents(manifest, split, batch_size=batch_size, rank=rank, world_size=world_size)
