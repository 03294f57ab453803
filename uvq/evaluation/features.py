"""Feature sets (method section 6): image sets, their content hashes, Inception features, the cache.

The paper evaluates samples with 2048-d InceptionV3 pool features (torch-fidelity's
`inception-v3-compat` extractor) over 50k samples against the training set. This module says
what a set of images is (a folder, a `uvq sample` directory, webdataset shards, the demo set,
or a stored features / statistics file standing for one), hashes it by content, and extracts
its features through the registered extractor, cached by content (never by name). The metrics
on those features are in uvq.evaluation.metrics.

The module reads top to bottom: what a set of images is, the feature extractor, then how a
set's features are extracted and cached.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from uvq.files import atomic_path, sha256_file
from uvq.images import to_rgb
from uvq.progress import ProgressFn, null_progress
from uvq.registry import register
from uvq.runtime import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")

# ---------------------------------------------------------------------------------------------
# Image sets: the samples and the reference, read in a fixed order and hashed by content
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One image of a set: its key (stable name inside the set) and where its bytes are."""

    key: str
    path: Path
    member: str | None = None  # tar member name for webdataset shards
    demo: tuple[int, int] | None = None  # (index, size) of an image of the embedded demo set


@dataclass
class ImageSet:
    """A set of images to evaluate, or a stored features / statistics file standing for one.

    `kind` is "folder", "samples" (a `uvq sample` output directory), "webdataset", "demo", "features"
    (an [N, D] array in .npy / .safetensors) or "stats" (an .npz with mu and sigma).
    `content_sha256` hashes every key and every byte in order: two sets with the same hash are
    the same images, whatever their names.
    """

    source: str
    kind: str
    items: list[Item] = field(default_factory=list)
    content_sha256: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # samples.json of a `uvq sample` directory

    @property
    def is_images(self) -> bool:
        return self.kind in ("folder", "samples", "webdataset", "demo")

    def describe(self) -> dict[str, Any]:
        out = {"source": self.source, "kind": self.kind, "content_sha256": self.content_sha256}
        if self.is_images:
            out["n_files"] = len(self.items)
        if self.meta:
            out["sample_meta"] = self.meta
        return out


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def _folder_items(root: Path, pattern: str = "**/*") -> list[Item]:
    files = sorted(p for p in root.glob(pattern) if p.is_file() and _is_image_name(p.name)
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return [Item(p.relative_to(root).as_posix(), p) for p in files]


def _shard_items(shards: Sequence[Path]) -> list[Item]:
    """Webdataset convention: members `dir/key.ext` group by key; one image per key."""
    items: list[Item] = []
    for shard in shards:
        seen: set[str] = set()
        try:
            with tarfile.open(shard, "r:*") as tar:
                for m in tar:
                    if not m.isfile() or not _is_image_name(m.name):
                        continue
                    base = m.name.rsplit("/", 1)
                    stem = base[-1].split(".", 1)[0]
                    key = (base[0] + "/" if len(base) == 2 else "") + stem
                    if key in seen:  # a second image of the same sample (e.g. .png and .jpg)
                        continue
                    seen.add(key)
                    items.append(Item(f"{shard.name}/{key}", shard, m.name))
        except (tarfile.TarError, OSError) as exc:
            raise UserError(f"webdataset shard {shard} cannot be read ({exc}); check the file or remove it from the set") from exc
    return items


def _expand_shards(source: str) -> list[Path]:
    from braceexpand import braceexpand

    paths = [Path(p) for p in braceexpand(source)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"webdataset shard {missing[0]} does not exist ({len(missing)} of {len(paths)} missing); check the pattern {source!r}")
    return paths


def _samples_meta(path: Path) -> dict[str, Any]:
    """The provenance `uvq sample` wrote, minus long per-image lists."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(meta, dict):
        return {}
    return {k: v for k, v in meta.items() if len(json.dumps(v, default=str)) <= 4096}


def open_set(source: str | Path, *, role: str = "set", progress: ProgressFn | None = None) -> ImageSet:
    """Resolve `source` into an ordered, content-hashed set (or a features / statistics file).

    Accepts an image folder (recursive, sorted by relative path), a `uvq sample` output
    directory (its sample-*.png), webdataset shards (a .tar, a brace pattern, or a folder of
    .tar files), the embedded demo set (`demo[:N][@SIZE]`), a features file (.npy / .safetensors, [N, D]) or a statistics file (.npz with
    mu and sigma). Remote URLs are not read: copy the shards locally first.
    """
    progress = progress or null_progress
    text = str(source)
    if "://" in text or text.startswith("pipe:"):
        raise UserError(f"{role} {text!r} is a URL; evaluation reads local files only: download the shards and pass their path")
    path = Path(text)
    demo = re.fullmatch(r"demo(?::(\d+))?(?:@(\d+))?", text)
    if demo and not path.exists():
        # The embedded demo set (uvq.data.demo), drawn at a size: demo[:N][@SIZE], the demo recipe's
        # 2048 images at 32 px by default.
        from uvq.data.demo import demo_key

        n, size = int(demo.group(1) or 2048), int(demo.group(2) or 32)
        items, kind, meta = [Item(demo_key(i), path, demo=(i, size)) for i in range(n)], "demo", {}
    elif "{" in text and not path.exists():
        items, kind = _shard_items(_expand_shards(text)), "webdataset"
        meta: dict[str, Any] = {}
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".npz", ".npy", ".safetensors"):
            return ImageSet(text, "stats" if suffix == ".npz" else "features", [], sha256_file(path))
        if suffix == ".tar":
            items, kind, meta = _shard_items([path]), "webdataset", {}
        else:
            raise UserError(f"{role} {path} is a single file; pass a folder of images, webdataset shards (.tar), "
                            "a features file (.npy/.safetensors) or a statistics file (.npz)")
    elif path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if (path / "samples.json").is_file():
            items, kind, meta = _folder_items(path, "sample-*.png"), "samples", _samples_meta(path / "samples.json")
            if not items:
                items = _folder_items(path)
        elif shards and not _folder_items(path):
            items, kind, meta = _shard_items(shards), "webdataset", {}
        else:
            items, kind, meta = _folder_items(path), "folder", {}
    else:
        raise UserError(f"{role} {text} does not exist; pass an image folder, webdataset shards, or a features/statistics file")
    if not items:
        raise UserError(f"{role} {text} holds no images (looked for {', '.join(IMAGE_EXTS)}); point it at a folder or shards with images")

    # The content hash reads every byte once; a changed, added, removed or renamed image
    # changes it, so caches keyed by it can never serve stale features.
    digest = hashlib.sha256()
    progress({"event": "start", "task": f"hash {role}", "total": len(items), "unit": "img"})
    for n, (item, data) in enumerate(iter_bytes(items), 1):
        digest.update(item.key.encode() + b"\0" + hashlib.sha256(data).digest())
        if n % 256 == 0 or n == len(items):
            progress({"event": "advance", "task": f"hash {role}", "n": 256 if n % 256 == 0 else n % 256, "metrics": {}})
    progress({"event": "end", "task": f"hash {role}"})
    return ImageSet(text, kind, items, digest.hexdigest(), meta)


def iter_bytes(items: Sequence[Item]) -> Iterator[tuple[Item, bytes]]:
    """Yield (item, raw bytes) in order; tar shards are streamed, never seeked member by member."""
    i = 0
    while i < len(items):
        item = items[i]
        if item.demo is not None:
            from uvq.data.demo import demo_array

            buf = io.BytesIO()
            Image.fromarray(demo_array(*item.demo)).save(buf, format="PNG")
            yield item, buf.getvalue()
            i += 1
            continue
        if item.member is None:
            try:
                data = item.path.read_bytes()
            except OSError:
                data = b""  # unreadable: decoding fails later and is counted there
            yield item, data
            i += 1
            continue
        wanted: dict[str, list[Item]] = {}
        j = i
        while j < len(items) and items[j].path == item.path:
            wanted.setdefault(items[j].member, []).append(items[j])
            j += 1
        found: dict[str, bytes] = {}
        with tarfile.open(item.path, "r:*") as tar:
            for m in tar:
                if m.name in wanted and m.name not in found:
                    fh = tar.extractfile(m)
                    found[m.name] = fh.read() if fh is not None else b""
        for it in items[i:j]:
            yield it, found.get(it.member, b"")
        i = j


def decode_uint8(data: bytes) -> np.ndarray | None:
    """Bytes -> HWC uint8 RGB at the image's own size, or None when they are not a usable image.

    The bad-image policy (decompression-bomb limit, truncated files) is uvq.data.sources's.
    """
    from uvq.data.sources import BadImage, open_image

    try:
        im = open_image(io.BytesIO(data))
        return np.asarray(to_rgb(im), dtype=np.uint8).copy()
    except BadImage:
        return None


# ---------------------------------------------------------------------------------------------
# Feature extractor: torch-fidelity's inception-v3-compat, 2048-d pool features (method 6)
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
    import os

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
    if cache_file.is_file():
        from safetensors import safe_open

        with safe_open(str(cache_file), "np") as fh:
            meta = json.loads(fh.metadata()["uvq"])
            if meta.get("cache_key") == key:
                feats = fh.get_tensor("features")
                info = {**image_set.describe(), **meta["set"], "cache_file": str(cache_file), "cache_hit": True}
                return SetFeatures(info, features=feats)

    n = len(image_set.items)
    feats = np.zeros((n, extractor.dim), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    sizes: Counter[str] = Counter()
    unreadable: list[str] = []
    pending: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}

    def flush(shape: tuple[int, int]) -> None:
        batch = pending.pop(shape)
        x = torch.from_numpy(np.stack([a for _, a in batch])).permute(0, 3, 1, 2).contiguous()  # [B,H,W,3] -> [B,3,H,W]
        out = extractor(x).numpy()
        for (idx, _), f in zip(batch, out, strict=True):
            feats[idx], ok[idx] = f, True
        progress({"event": "advance", "task": f"features {role}", "n": len(batch), "metrics": {}})

    progress({"event": "start", "task": f"features {role}", "total": n, "unit": "img"})
    for idx, (item, data) in enumerate(iter_bytes(image_set.items)):
        arr = decode_uint8(data)
        if arr is None:
            unreadable.append(item.key)
            progress({"event": "advance", "task": f"features {role}", "n": 1, "metrics": {}})
            continue
        shape = (arr.shape[0], arr.shape[1])
        sizes[f"{shape[1]}x{shape[0]}"] += 1
        pending.setdefault(shape, []).append((idx, arr))
        if len(pending[shape]) >= batch_size:
            flush(shape)
    for shape in list(pending):
        flush(shape)
    progress({"event": "end", "task": f"features {role}"})
    if not ok.any():
        raise UserError(f"{role} {image_set.source}: none of its {n} files is a readable image; check the files")

    set_meta = {"n_images": int(ok.sum()), "dim": extractor.dim, "sizes": dict(sorted(sizes.items())),
                "resized_to": None if set(sizes) == {f"{extractor.input_size}x{extractor.input_size}"} else
                f"{extractor.input_size}x{extractor.input_size}",
                "unreadable": {"count": len(unreadable), "examples": unreadable[:10]}}
    feats = feats[ok]
    from safetensors.numpy import save_file

    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache_file) as tmp:
        save_file({"features": feats}, str(tmp), metadata={"uvq": json.dumps(
            {"cache_key": key, "extractor": extractor.describe(), "set": {**image_set.describe(), **set_meta}})})
    return SetFeatures({**image_set.describe(), **set_meta, "cache_file": str(cache_file), "cache_hit": False}, features=feats)


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
