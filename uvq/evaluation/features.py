"""Feature sets (docs/method.md section 6): image sets, their content hashes, Inception features, the cache.

The paper evaluates samples with 2048-d InceptionV3 pool features (torch-fidelity's
`inception-v3-compat` extractor) over 50k samples against the training set. This module says
what a set of images is (any image source of uvq.data.sources: a folder, webdataset shards
local or remote or `pipe:`, the demo set, a plugin stream; a `uvq sample` directory; or a
stored features / statistics file standing for one), hashes it by content, and extracts
its features through the registered extractor, cached by content (never by name). The metrics
on those features are in uvq.evaluation.metrics.

The module reads top to bottom: what a set of images is, the feature extractor, then how a
set's features are extracted and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uvq.config import DataConfig
from uvq.data.sources import (
    BadImage,
    DemoSource,
    FolderSource,
    build_source,
    decode_image,
    encoded_images,
    is_indexable,
)
from uvq.files import atomic_path, sha256_file
from uvq.progress import ProgressFn, null_progress
from uvq.registry import register
from uvq.runtime import UserError, all_gather, batch_share, dist_info, on_main

FEATURE_FILES = (".npz", ".npy", ".safetensors")

# ---------------------------------------------------------------------------------------------
# Image sets: the samples and the reference, read in a fixed order and hashed by content
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """A set of images to evaluate, or a stored features / statistics file standing for one.

    `kind` is "folder", "samples" (a `uvq sample` output directory), "webdataset", "demo", a
    plugin stream's name, "features" (an [N, D] array in .npy / .safetensors) or "stats" (an
    .npz with mu and sigma). `reader` is the image source (uvq.data.sources) and `keys` its keys
    in reading order. `content_sha256` hashes every key and every byte in order: two sets with
    the same hash are the same images, whatever their names.
    """

    source: str
    kind: str
    keys: list[str] = field(default_factory=list)
    content_sha256: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # samples.json of a `uvq sample` directory
    reader: Any = None

    @property
    def is_images(self) -> bool:
        return self.kind not in ("features", "stats")

    def describe(self) -> dict[str, Any]:
        out = {"source": self.source, "kind": self.kind, "content_sha256": self.content_sha256}
        if self.is_images:
            out["n_files"] = len(self.keys)
        if self.meta:
            out["sample_meta"] = self.meta
        return out


def _samples_meta(path: Path) -> dict[str, Any]:
    """The provenance `uvq sample` wrote, minus long per-image lists."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(meta, dict):
        return {}
    return {k: v for k, v in meta.items() if len(json.dumps(v, default=str)) <= 4096}


_KINDS = {"folder.v1": "folder", "webdataset.v1": "webdataset", "demo.v1": "demo"}


def _reader(text: str, role: str, stream: str) -> tuple[Any, str, dict[str, Any]]:
    """The image source for `text` (uvq.data.sources), its kind, and a sample directory's meta."""
    path = Path(text)
    demo = re.fullmatch(r"demo(?::(\d+))?(?:@(\d+))?", text)
    if stream == "auto" and demo and not path.exists():
        # The embedded demo set drawn at a size: demo[:N][@SIZE], the demo recipe's 2048 images
        # at 32 px by default.
        return DemoSource(int(demo.group(1) or 2048), size=int(demo.group(2) or 32)), "demo", {}
    if stream == "auto" and path.is_dir() and (path / "samples.json").is_file():
        try:
            reader = FolderSource(path, include="sample-*")
        except UserError:  # renamed files: every image of the directory
            reader = FolderSource(path)
        return reader, "samples", _samples_meta(path / "samples.json")
    if stream == "auto" and path.is_file() and path.suffix.lower() != ".tar" and "{" not in text:
        raise UserError(f"{role} {path} is a single file; pass a folder of images, webdataset shards (.tar), "
                        "a features file (.npy/.safetensors) or a statistics file (.npz)")
    try:
        reader = build_source(DataConfig(source=text, stream=stream))
    except UserError as exc:
        raise UserError(f"{role}: {exc}") from None
    return reader, _KINDS.get(reader.name, reader.name), {}


def open_set(source: str | Path, *, role: str = "set", stream: str = "auto",
             progress: ProgressFn | None = None) -> ImageSet:
    """Resolve `source` into an ordered, content-hashed set (or a features / statistics file).

    Images come through uvq.data.sources, as every stage reads them: an image folder (recursive,
    sorted by key), webdataset shards (a .tar, a brace pattern, a URL, a `pipe:` command, or a
    folder of .tar files), the embedded demo set (`demo[:N][@SIZE]`), or a plugin stream named
    by `stream`; a `uvq sample` output directory gives its sample-*.png. A features file (.npy /
    .safetensors, [N, D]) or a statistics file (.npz with mu and sigma) stands for a set.
    """
    progress = progress or null_progress
    text = str(source)
    path = Path(text)
    if stream == "auto" and path.is_file() and path.suffix.lower() in FEATURE_FILES:
        return ImageSet(text, "stats" if path.suffix.lower() == ".npz" else "features", [], sha256_file(path))
    reader, kind, meta = _reader(text, role, stream)
    for message in reader.warnings:
        progress({"event": "warn", "message": f"{role}: {message}"})

    # The content hash reads every byte once; a changed, added, removed or renamed image
    # changes it, so caches keyed by it can never serve stale features.
    digest = hashlib.sha256()
    total = len(reader.keys) if is_indexable(reader) else None
    keys: list[str] = []
    progress({"event": "start", "task": f"hash {role}", "total": total, "unit": "img"})
    for _pos, key, _origin, data in encoded_images(reader):
        digest.update(key.encode() + b"\0" + hashlib.sha256(data).digest())
        keys.append(key)
        if len(keys) % 256 == 0:
            progress({"event": "advance", "task": f"hash {role}", "n": 256, "metrics": {}})
    if len(keys) % 256:
        progress({"event": "advance", "task": f"hash {role}", "n": len(keys) % 256, "metrics": {}})
    progress({"event": "end", "task": f"hash {role}"})
    if not keys:
        raise UserError(f"{role} {text} holds no images; point it at a folder or shards with images")
    return ImageSet(text, kind, keys, digest.hexdigest(), meta, reader)


# ---------------------------------------------------------------------------------------------
# Feature extractor: torch-fidelity's inception-v3-compat, 2048-d pool features (docs/method.md section 6)
# ---------------------------------------------------------------------------------------------

# torch-fidelity downloads these weights with torch.hub.load_state_dict_from_url, which stores
# them under `torch.hub.get_dir()/checkpoints/` ($TORCH_HOME/hub/checkpoints, by default
# ~/.cache/torch/hub/checkpoints). We never download: an offline run must say what to place where.
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def default_inception_weights() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def resolve_inception_weights(path: str | Path | None) -> Path:
    """The weights file to use: `path` if given, else torch-fidelity's download location."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"Inception weights file {path} does not exist; download {INCEPTION_URL} and give its path")
        return path
    default = default_inception_weights()
    if default.is_file():
        return default
    raise UserError(f"Inception weights not found: download {INCEPTION_URL} and place it at {default} "
                    "(or give its path: --inception-weights PATH, or eval.inception_weights in a recipe)")


class InceptionFeatures:
    """torch-fidelity's FeatureExtractorInceptionV3 ('2048' pool features) on any device.

    Input: uint8 [B,3,H,W] at any size; torch-fidelity itself resizes to 299x299 with its
    TensorFlow-1-compatible bilinear interpolation and scales to [-1,1], as the paper's
    evaluation did. Output: float32 [B,2048].
    """

    name = "inception-v3-compat.v1"
    dim = 2048
    input_size = 299

    def __init__(self, weights_path: str | Path, device: torch.device | str = "cpu") -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights_path = Path(weights_path)
        self.device = torch.device(device)
        # torch-fidelity reads the file with weights_only=False; refuse anything that is not a
        # plain tensor state dict first, so no untrusted pickle is ever executed.
        try:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"Inception weights {self.weights_path} are not a plain state dict ({type(exc).__name__}); "
                            f"use torch-fidelity's {INCEPTION_FILE}") from exc
        if not isinstance(state, dict) or "fc.weight" not in state:
            raise UserError(f"Inception weights {self.weights_path} are not an inception-v3-compat state dict; "
                            f"use torch-fidelity's {INCEPTION_FILE}")
        del state
        try:
            self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                     feature_extractor_weights_path=str(self.weights_path))
        except RuntimeError as exc:
            raise UserError(f"Inception weights {self.weights_path} do not fit inception-v3-compat "
                            f"({str(exc).splitlines()[0]}); use torch-fidelity's {INCEPTION_FILE}") from exc
        self.model.to(self.device)
        self.weights_sha256 = sha256_file(self.weights_path)

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"input": "uint8 RGB", "resize": f"bilinear to {self.input_size}x{self.input_size} (torch-fidelity, TF1-compatible)",
                "scale": "(x - 128) / 128", "feature": "2048 (pool3)"}

    def describe(self) -> dict[str, Any]:
        import torch_fidelity

        return {"name": self.name, "weights": str(self.weights_path), "weights_sha256": self.weights_sha256,
                "torch_fidelity_version": torch_fidelity.__version__, "preprocessing": self.preprocessing}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        (feats,) = self.model(images.to(self.device))  # [B,3,H,W] uint8 -> [B,2048]
        return feats.float().cpu()


@register("feature_extractors", "inception-v3-compat.v1")
def build_inception_v3_compat(cfg, device: torch.device | str = "cpu") -> InceptionFeatures:
    """Builder from an `EvalConfig`: weights from `cfg.inception_weights` or torch-fidelity's cache."""
    return InceptionFeatures(resolve_inception_weights(cfg.inception_weights), device)


# ---------------------------------------------------------------------------------------------
# Features of a set, cached by content
# ---------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] of features [N, D] (float64, unbiased as np.cov)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if features.shape[0] < 2:
        raise UserError(f"FID needs at least 2 images per set to estimate a covariance; got {features.shape[0]}")
    stats = fid_features_to_statistics(torch.from_numpy(np.ascontiguousarray(features)))
    return stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)


@dataclass
class SetFeatures:
    """What the metrics consume: features [N, D] (None for a statistics file) and/or mu, sigma."""

    info: dict[str, Any]
    features: np.ndarray | None = None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mu is None:
            self.mu, self.sigma = feature_statistics(self.features)
        return self.mu, self.sigma


def default_cache_dir() -> Path:
    root = os.environ.get("UVQ_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "uvq")
    return Path(root) / "features"


def _cache_key(image_set: ImageSet, extractor: InceptionFeatures) -> str:
    spec = {"format": 1, "set_sha256": image_set.content_sha256, "extractor": extractor.name,
            "weights_sha256": extractor.weights_sha256, "preprocessing": extractor.preprocessing}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _load_feature_file(image_set: ImageSet, dim: int | None, role: str) -> SetFeatures:
    path = Path(image_set.source)
    info = image_set.describe()
    if image_set.kind == "stats":
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise UserError(f"{role} statistics file {path} must hold arrays 'mu' and 'sigma' (has {sorted(data.files)})")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise UserError(f"{role} statistics file {path} has mu {mu.shape} and sigma {sigma.shape}; expected [D] and [D, D]")
        if dim is not None and mu.shape[0] != dim:
            raise UserError(f"{role} statistics file {path} has dimension {mu.shape[0]}; the extractor gives {dim}")
        return SetFeatures({**info, "n_images": None, "dim": int(mu.shape[0])}, mu=mu, sigma=sigma)
    if path.suffix.lower() == ".npy":
        feats = np.load(path, allow_pickle=False)
    else:
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if "features" not in tensors:
            raise UserError(f"{role} features file {path} must hold a tensor named 'features' (has {sorted(tensors)})")
        feats = tensors["features"]
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise UserError(f"{role} features file {path} has shape {feats.shape}; expected [N, D] with N >= 1")
    if dim is not None and feats.shape[1] != dim:
        raise UserError(f"{role} features file {path} has dimension {feats.shape[1]}; the extractor gives {dim}")
    return SetFeatures({**info, "n_images": int(feats.shape[0]), "dim": int(feats.shape[1])}, features=feats.astype(np.float32))


def extract_features(image_set: ImageSet, extractor: InceptionFeatures, *, batch_size: int = 64,
                     cache_dir: str | Path | None = None, role: str = "set",
                     progress: ProgressFn | None = None) -> SetFeatures:
    """Features of every readable image of the set, from the cache when its content was seen before.

    Images are decoded at their own size and batched with others of the same size, so a set of
    mixed sizes gives exactly what the extractor gives each image alone. Unreadable files are
    counted and skipped; a set with none readable is an error.
    """
    progress = progress or null_progress
    if not image_set.is_images:
        return _load_feature_file(image_set, extractor.dim if extractor else None, role)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(image_set, extractor)
    cache_file = cache / f"{key[:40]}.safetensors"
    # Under torchrun rank 0 reads the cache and every rank gets its answer (uvq.runtime.on_main),
    # so the ranks agree on a hit even where the cache directory is not shared.
    cached = on_main(lambda: _read_cache(cache_file, key, image_set))
    if cached is not None:
        return cached

    # This rank's share: a contiguous run of whole batches of the set's order (uvq.runtime.batch_share;
    # all of it in one process), so a set of one image size gives each image the features of a
    # one-process run, bit for bit. Rank 0 gathers the shares and writes the cache once.
    dist = dist_info()
    n = len(image_set.keys)
    first, count = batch_share(n, batch_size, dist)
    indices = None if not dist.enabled else set(range(first, first + count))
    feats = np.zeros((n, extractor.dim), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    sizes: Counter[str] = Counter()
    unreadable: list[str] = []
    pending: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}

    def flush(shape: tuple[int, int]) -> None:
        batch = pending.pop(shape)
        x = torch.stack([a for _, a in batch])  # uint8 [B,3,H,W]
        out = extractor(x).numpy()
        for (idx, _), f in zip(batch, out, strict=True):
            feats[idx], ok[idx] = f, True
        progress({"event": "advance", "task": f"features {role}", "n": len(batch), "metrics": {}})

    progress({"event": "start", "task": f"features {role}", "total": count, "unit": "img"})
    for idx, name, _origin, data in encoded_images(image_set.reader, indices) if count else ():
        try:
            arr = decode_image(data, None)  # uint8 [3,H,W] at the image's own size
        except BadImage:
            unreadable.append(name)
            progress({"event": "advance", "task": f"features {role}", "n": 1, "metrics": {}})
            continue
        shape = (arr.shape[1], arr.shape[2])
        sizes[f"{shape[1]}x{shape[0]}"] += 1
        pending.setdefault(shape, []).append((idx, arr))
        if len(pending[shape]) >= batch_size:
            flush(shape)
    for shape in list(pending):
        flush(shape)
    progress({"event": "end", "task": f"features {role}"})
    if dist.enabled:
        shares = all_gather((first, feats[first:first + count], ok[first:first + count], sizes, unreadable))
        sizes, unreadable = Counter(), []
        for start, part_feats, part_ok, part_sizes, part_bad in shares:
            feats[start:start + len(part_ok)], ok[start:start + len(part_ok)] = part_feats, part_ok
            sizes.update(part_sizes)
            unreadable.extend(part_bad)
    if not ok.any():
        raise UserError(f"{role} {image_set.source}: none of its {n} files is a readable image; check the files")

    set_meta = {"n_images": int(ok.sum()), "dim": extractor.dim, "sizes": dict(sorted(sizes.items())),
                "resized_to": None if set(sizes) == {f"{extractor.input_size}x{extractor.input_size}"} else
                f"{extractor.input_size}x{extractor.input_size}",
                "unreadable": {"count": len(unreadable), "examples": unreadable[:10]}}
    feats = feats[ok]
    on_main(lambda: _write_cache(cache_file, feats, {"cache_key": key, "extractor": extractor.describe(),
                                                     "set": {**image_set.describe(), **set_meta}}))
    return SetFeatures({**image_set.describe(), **set_meta, "cache_file": str(cache_file), "cache_hit": False}, features=feats)


def _read_cache(cache_file: Path, key: str, image_set: ImageSet) -> SetFeatures | None:
    """The cached features of `image_set` (a file named after `key` that holds that key), or None."""
    if not cache_file.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(cache_file), "np") as fh:
        meta = json.loads(fh.metadata()["uvq"])
        if meta.get("cache_key") != key:
            return None
        feats = fh.get_tensor("features")
    info = {**image_set.describe(), **meta["set"], "cache_file": str(cache_file), "cache_hit": True}
    return SetFeatures(info, features=feats)


def _write_cache(cache_file: Path, feats: np.ndarray, meta: dict[str, Any]) -> None:
    """Write a cache file atomically (rank 0 only under torchrun)."""
    from safetensors.numpy import save_file

    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache_file) as tmp:
        save_file({"features": feats}, str(tmp), metadata={"uvq": json.dumps(meta)})


def set_warnings(role: str, info: dict[str, Any]) -> list[str]:
    """Resizing and unreadable files, said once per set."""
    out = []
    if info.get("resized_to"):
        sizes = ", ".join(f"{s} x{c}" for s, c in info["sizes"].items())
        out.append(f"{role}: images resized to {info['resized_to']} for the extractor (sizes: {sizes})")
        if len(info["sizes"]) > 1:
            out.append(f"{role}: the set mixes {len(info['sizes'])} image sizes; metrics then compare differently resized images")
    bad = info.get("unreadable", {}).get("count", 0)
    if bad:
        out.append(f"{role}: {bad} unreadable file(s) skipped, e.g. {', '.join(info['unreadable']['examples'][:3])}")
    return out
