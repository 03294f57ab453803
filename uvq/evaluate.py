"""Evaluation (method section 6): image sets, Inception features, FID/KID, PRDC, reconstructions.

The paper evaluates samples with 2048-d InceptionV3 pool features (torch-fidelity's
`inception-v3-compat` extractor) over 50k samples against the training set: FID, and the
precision / recall / density / coverage of Naeem et al. (2020) with the official code's
nearest_k = 3. The VQGAN is judged by the FID of its reconstructions (Table 5).

The module reads top to bottom: what a set of images is, how its features are extracted and
cached (by content, never by name), the metrics on features, then the reports and the
reconstruction metrics of stage one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from uvq import __version__
from uvq.files import atomic_path, atomic_write_json, sha256_file
from uvq.images import to_rgb
from uvq.progress import ProgressFn, null_progress
from uvq.registry import register
from uvq.runtime import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")
REPORT_MARKER = "uvq_report"  # every report we write carries it; files without it are not ours

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
        # The embedded demo set (uvq.demo), drawn at a size: demo[:N][@SIZE], the demo recipe's
        # 2048 images at 32 px by default.
        from uvq.demo import demo_key

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
            from uvq.demo import demo_array

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

    The bad-image policy (decompression-bomb limit, truncated files) is uvq.data's.
    """
    from uvq.data import BadImage, open_image

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
            raise UserError(f"--inception-weights {path} does not exist; download {INCEPTION_URL} and pass its path")
        return path
    default = default_inception_weights()
    if default.is_file():
        return default
    raise UserError(f"Inception weights not found: download {INCEPTION_URL} and place it at {default} "
                    "(or pass --inception-weights PATH)")


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


# ---------------------------------------------------------------------------------------------
# FID and KID (through torch-fidelity's own functions)
# ---------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] of features [N, D] (float64, unbiased as np.cov)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if features.shape[0] < 2:
        raise UserError(f"FID needs at least 2 images per set to estimate a covariance; got {features.shape[0]}")
    stats = fid_features_to_statistics(torch.from_numpy(np.ascontiguousarray(features)))
    return stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Fréchet distance of two Gaussians.

    torch-fidelity's own form: the trace of the matrix square root as the sum of square roots of
    the eigenvalues of S1 S2.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    s1 = {"mu": np.asarray(mu1, np.float64), "sigma": np.asarray(sigma1, np.float64)}
    s2 = {"mu": np.asarray(mu2, np.float64), "sigma": np.asarray(sigma2, np.float64)}
    if s1["mu"].shape != s2["mu"].shape:
        raise UserError(f"FID of features of different dimensions: {s1['mu'].shape[0]} and {s2['mu'].shape[0]}")
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> dict[str, Any]:
    """Unbiased MMD^2 with the cubic polynomial kernel over random subsets (Binkowski et al. 2018).

    torch-fidelity's defaults (100 subsets of 1000); the subset size shrinks to the smaller set.
    """
    from torch_fidelity.metric_kid import (
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        kid_features_to_metric,
    )

    size = min(subset_size, len(f1), len(f2))
    if size < 2:
        raise UserError(f"KID needs at least 2 images per set; got {len(f1)} and {len(f2)}")
    out = kid_features_to_metric(torch.from_numpy(np.ascontiguousarray(f1)), torch.from_numpy(np.ascontiguousarray(f2)),
                                 kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return {"kid": float(out[KEY_METRIC_KID_MEAN]), "kid_std": float(out[KEY_METRIC_KID_STD]),
            "kid_subsets": subsets, "kid_subset_size": size}


# ---------------------------------------------------------------------------------------------
# Precision, recall, density, coverage (Naeem et al. 2020), in bounded memory
# ---------------------------------------------------------------------------------------------
#
# With r_i the distance from real i to its k-th nearest other real (prdc: the (k+1)-th
# smallest including itself) and s_j likewise among the fakes:
#   precision = mean_j [exists i: d(i,j) < r_i]      density  = mean_j (1/k) #{i: d(i,j) < r_i}
#   recall    = mean_i [exists j: d(i,j) < s_j]      coverage = mean_i [exists j: d(i,j) < r_i]
# Distances are computed a block of rows at a time (never an N x N matrix) as
# |x|^2 + |y|^2 - 2 x.y in float32 on centred features, and every comparison whose float32
# margin is within the rounding bound is recomputed exactly in float64, so the result equals
# exact arithmetic (and the `prdc` package, which works on float64-accurate sklearn distances).


def _tolerance(dim: int) -> float:
    # Relative rounding bound of the float32 expansion, as a fraction of |x|^2 + |y|^2. Measured
    # errors are ~2e-7 at D=2048; this keeps a margin of about 200x.
    return 1e-6 * max(8.0, math.sqrt(dim))


class _Blocks:
    """Features held once: centred float32 copies for the fast pass, originals for exact checks."""

    def __init__(self, x: torch.Tensor, mean: torch.Tensor, device: torch.device) -> None:
        self.exact = x  # [N, D] original values (float32 or float64), on the device
        # a float32 mean shifts both sets alike, so distances keep only the subtraction's rounding
        self.fast = x.float() - mean.float()  # [N, D]
        self.sq = self.fast.pow(2).sum(1)  # [N]

    def __len__(self) -> int:
        return self.fast.shape[0]


def _sqdist(a: _Blocks, rows: slice, b: _Blocks) -> torch.Tensor:
    """Approximate squared distances [c, Nb] from rows of `a` to all of `b` (float32)."""
    d = a.sq[rows, None] + b.sq[None, :] - 2.0 * (a.fast[rows] @ b.fast.T)
    return d.clamp_min_(0.0)


def _exact_pairs(a: _Blocks, ia: torch.Tensor, b: _Blocks, ib: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Exact squared distances (float64) for the index pairs (ia[n], ib[n])."""
    out = torch.empty(ia.shape[0], dtype=torch.float64, device=ia.device)
    for s in range(0, ia.shape[0], chunk):
        diff = a.exact[ia[s:s + chunk]].double() - b.exact[ib[s:s + chunk]].double()  # [n, D]
        out[s:s + chunk] = diff.pow(2).sum(1)
    return out


def _less(d: torch.Tensor, thresh: torch.Tensor, tol: torch.Tensor, a: _Blocks, rows: slice, b: _Blocks) -> torch.Tensor:
    """[c, Nb] booleans d_exact(row, col) < thresh, with `thresh` exact float64 squared radii.

    Decided in float32 where the margin exceeds `tol`; the rest recomputed exactly.
    """
    t32 = thresh.float()
    less = d < t32
    unsure = (d - t32).abs_() <= tol
    if unsure.any():
        r, c = unsure.nonzero(as_tuple=True)
        exact = _exact_pairs(a, r + rows.start, b, c)
        t = thresh.expand_as(d)[r, c]
        less[r, c] = exact < t
    return less


def _kth_radii(x: _Blocks, k: int, chunk: int, tol_rel: float, progress: ProgressFn, task: str) -> torch.Tensor:
    """Exact squared distance from each point to its k-th nearest other point ([N] float64)."""
    n = len(x)
    radii = torch.empty(n, dtype=torch.float64, device=x.fast.device)
    sq_max = x.sq.max()
    for s in range(0, n, chunk):
        rows = slice(s, min(s + chunk, n))
        idx = torch.arange(rows.start, rows.stop, device=x.fast.device)
        d = _sqdist(x, rows, x)  # [c, N]
        d[idx - s, idx] = 0.0  # the point itself, at distance exactly 0 as in prdc
        tol = tol_rel * (x.sq[rows] + sq_max)  # [c]
        todo = torch.arange(rows.stop - rows.start, device=d.device)
        m = min(n, k + 9)
        while todo.numel():
            rows_left = d if todo.numel() == d.shape[0] else d[todo]  # no copy on the first round
            vals, cand = rows_left.topk(m, dim=1, largest=False)  # [t, m], ascending
            # Every float32 value is within t of its exact value, so the exact (k+1)-th smallest
            # lies within t of the float32 one, v. Candidates below v - 2t are surely nearer,
            # those above v + 2t surely farther; only the window between needs exact distances.
            t = tol[todo, None]  # [t, 1]
            v = vals[:, k:k + 1]
            below = (vals < v - 2 * t).sum(1)  # [t]
            window = (vals >= v - 2 * t) & (vals <= v + 2 * t)  # [t, m]
            # Certified when every point left out (float32 >= the m-th) is surely farther.
            done = (m == n) | (vals[:, -1:] > v + 2 * t).squeeze(1)
            r_i, c_i = window.nonzero(as_tuple=True)
            exact = torch.full(vals.shape, math.inf, dtype=torch.float64, device=d.device)
            exact[r_i, c_i] = _exact_pairs(x, todo[r_i] + s, x, cand[r_i, c_i])
            exact = exact.sort(dim=1).values  # window distances first, then +inf
            r = exact.gather(1, (k - below)[:, None]).squeeze(1)  # the (k+1)-th smallest, itself included
            radii[todo[done] + s] = r[done]
            todo = todo[~done]
            m = min(n, 2 * m)
        progress({"event": "advance", "task": task, "n": rows.stop - rows.start, "metrics": {}})
    return radii


def compute_prdc(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 5, *,
                 chunk_size: int | None = None, device: torch.device | str = "cpu",
                 memory_bytes: int = 256 << 20, progress: ProgressFn | None = None) -> dict[str, float]:
    """Precision, recall, density and coverage of `fake` [M, D] against `real` [N, D].

    Equal to `prdc.compute_prdc(real, fake, nearest_k=k)`. Peak memory is the features plus one
    [chunk, max(N, M)] block: `chunk_size` rows at a time, by default as many as fit in
    `memory_bytes` (about 18 bytes per block entry).
    """
    progress = progress or null_progress
    device = torch.device(device)
    real_t = torch.as_tensor(np.asarray(real) if not torch.is_tensor(real) else real).to(device)
    fake_t = torch.as_tensor(np.asarray(fake) if not torch.is_tensor(fake) else fake).to(device)
    if real_t.ndim != 2 or fake_t.ndim != 2 or real_t.shape[1] != fake_t.shape[1]:
        raise UserError(f"PRDC needs features [N, D] of one dimension; got {tuple(real_t.shape)} and {tuple(fake_t.shape)}")
    n, m = real_t.shape[0], fake_t.shape[0]
    if k < 1 or k >= min(n, m):
        raise UserError(f"PRDC's k={k} needs more than k images in each set (reference {n}, samples {m}); lower --k or add images")
    chunk = chunk_size or max(1, memory_bytes // (18 * max(n, m)))
    tol_rel = _tolerance(real_t.shape[1])

    # Centre both sets on the real mean: distances are unchanged and the float32 expansion
    # loses far less to cancellation. TF32 would break the rounding bound, so it is off here.
    mean = real_t.double().mean(0)
    x, y = _Blocks(real_t, mean, device), _Blocks(fake_t, mean, device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        progress({"event": "start", "task": "prdc", "total": n + 2 * m, "unit": "rows"})
        r_real = _kth_radii(x, k, chunk, tol_rel, progress, "prdc")
        r_fake = _kth_radii(y, k, chunk, tol_rel, progress, "prdc")
        precision = torch.zeros(m, dtype=torch.bool, device=device)
        density = torch.zeros(m, dtype=torch.int64, device=device)
        recall = torch.zeros(n, dtype=torch.bool, device=device)
        coverage = torch.zeros(n, dtype=torch.bool, device=device)
        x_sq_max = x.sq.max()
        for s in range(0, m, chunk):
            rows = slice(s, min(s + chunk, m))
            d = _sqdist(y, rows, x)  # [c, N]: fakes of this block against every real
            tol = (tol_rel * (y.sq[rows] + x_sq_max))[:, None]  # [c, 1]
            inside_real = _less(d, r_real[None, :], tol, y, rows, x)  # d(i,j) < r_i
            precision[rows] = inside_real.any(1)
            density[rows] = inside_real.sum(1)
            coverage |= inside_real.any(0)
            del inside_real
            recall |= _less(d, r_fake[rows, None], tol, y, rows, x).any(0)  # d(i,j) < s_j
            progress({"event": "advance", "task": "prdc", "n": rows.stop - rows.start, "metrics": {}})
        progress({"event": "end", "task": "prdc"})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"precision": precision.double().mean().item(), "recall": recall.double().mean().item(),
            "density": density.double().mean().item() / k, "coverage": coverage.double().mean().item()}


# ---------------------------------------------------------------------------------------------
# Metrics over two sets, with a provenance report
# ---------------------------------------------------------------------------------------------

SET_METRICS = ("fid", "kid", "prdc")


def _build_extractor(cfg_eval, device: torch.device) -> InceptionFeatures:
    from uvq.registry import registry

    return registry.get("feature_extractors", cfg_eval.feature_extractor)(cfg_eval, device)


def _is_feature_file(src: str | Path | ImageSet) -> bool:
    if isinstance(src, ImageSet):
        return not src.is_images
    return Path(str(src)).suffix.lower() in (".npy", ".npz", ".safetensors") and Path(str(src)).is_file()


def evaluate_metrics(metrics: Sequence[str], samples: str | Path | ImageSet, reference: str | Path | ImageSet, *,
                     cfg_eval, device: torch.device | str = "cpu", progress: ProgressFn | None = None,
                     seed: int = 0, cache_dir: str | Path | None = None,
                     extractor: InceptionFeatures | None = None) -> dict[str, Any]:
    """FID / KID / PRDC of `samples` against `reference`: the report, with full provenance.

    `cfg_eval` is an `EvalConfig` (feature extractor, k, batch size, Inception weights). The
    extractor is built only when a set is images. Returns {"results": {...}, "samples": info,
    "reference": info, "extractor": ..., "warnings": [...], ...}.
    """
    progress = progress or null_progress
    device = torch.device(device)
    bad = [m for m in metrics if m not in SET_METRICS]
    if bad or not metrics:
        raise UserError(f"unknown set metric(s) {bad or metrics}; valid: {', '.join(SET_METRICS)}")
    # Build the extractor first, so that missing weights fail before any set is read.
    if extractor is None and not all(_is_feature_file(src) for src in (samples, reference)):
        extractor = _build_extractor(cfg_eval, device)
    sets = {role: src if isinstance(src, ImageSet) else open_set(src, role=role, progress=progress)
            for role, src in (("samples", samples), ("reference", reference))}
    if sets["samples"].kind == "stats":
        raise UserError("samples must be images or a features file; a statistics file can only be a FID reference")
    if sets["reference"].kind == "stats" and {"kid", "prdc"} & set(metrics):
        raise UserError(f"reference {sets['reference'].source} holds only mu/sigma: it serves FID alone; "
                        "pass images or a features file for kid/prdc")
    feats = {role: extract_features(s, extractor, batch_size=cfg_eval.batch_size, cache_dir=cache_dir, role=role,
                                    progress=progress) for role, s in sets.items()}
    dims = {f.info["dim"] for f in feats.values()}
    if len(dims) > 1:
        raise UserError(f"samples and reference features differ in dimension ({sorted(dims)}); use one extractor for both")

    warnings = [w for role, f in feats.items() for w in set_warnings(role, f.info)]
    sizes = {role: set(f.info.get("sizes", {})) for role, f in feats.items()}
    if sizes["samples"] and sizes["reference"] and sizes["samples"] != sizes["reference"]:
        warnings.append(f"samples ({', '.join(sorted(sizes['samples']))}) and reference ({', '.join(sorted(sizes['reference']))}) "
                        "differ in image size; both are resized for the extractor")
    for w in warnings:
        progress({"event": "warn", "message": w})

    results: dict[str, Any] = {}
    s, r = feats["samples"], feats["reference"]
    if "fid" in metrics:
        results["fid"] = frechet_distance(*s.statistics(), *r.statistics())
    if "kid" in metrics:
        results.update(kernel_inception_distance(s.features, r.features, seed=seed))
    if "prdc" in metrics:
        results.update(compute_prdc(r.features, s.features, cfg_eval.k, device=device, progress=progress))
        results["k"] = cfg_eval.k
    return {
        REPORT_MARKER: "eval",
        "metrics": list(metrics),
        "results": results,
        "samples": s.info,
        "reference": r.info,
        "extractor": extractor.describe() if extractor is not None else None,
        "seed": seed,
        "device": str(device),
        "uvq_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "warnings": warnings,
    }


def default_report_path(samples: str | Path, name: str) -> Path:
    """Beside the samples: DIR/eval-<name>.json for a folder, else next to the file or shards."""
    path = Path(str(samples))
    if path.is_dir():
        return path / f"eval-{name}.json"
    parent = path.parent if path.parent.is_dir() else Path.cwd()
    return parent / f"eval-{name}.json"


def write_report(report: dict[str, Any], path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a report atomically; an existing file that is not one of our reports needs `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        try:
            ours = REPORT_MARKER in json.loads(path.read_text())
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise UserError(f"{path} exists and is not a uvq report; pass --overwrite to replace it or choose another --out")
    atomic_write_json(path, report)
    return path


# ---------------------------------------------------------------------------------------------
# Stage one: reconstruction quality of the VQGAN (Table 5)
# ---------------------------------------------------------------------------------------------


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0,1]: 10 log10(1 / MSE). [B,3,H,W] x2 -> [B]."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


def codebook_usage(counts: torch.Tensor) -> dict[str, Any]:
    """Codes used and the perplexity exp(H(p)) of the empirical code distribution p = counts / sum."""
    counts = counts.double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codes_used": int((counts > 0).sum()), "codebook_size": int(counts.numel()),
            "perplexity": float(entropy.exp())}


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


@torch.no_grad()
def evaluate_reconstruction(vqgan: torch.nn.Module, batches, *, device: torch.device | str = "cpu",
                            lpips_model: torch.nn.Module | None = None, extractor: InceptionFeatures | None = None,
                            grid_path: str | Path | None = None, grid_images: int = 8,
                            progress: ProgressFn | None = None, total: int | None = None) -> dict[str, Any]:
    """PSNR, LPIPS, reconstruction FID and codebook usage of `vqgan` over `batches` of [B,3,H,W] in [0,1].

    LPIPS is skipped without `lpips_model`, rFID without `extractor` (both need pretrained
    weights). rFID compares the originals' and reconstructions' features, both quantised to
    uint8 as an image file would be. The grid shows originals above their reconstructions.
    """
    progress = progress or null_progress
    device = torch.device(device)
    vqgan = vqgan.to(device).eval()
    codebook_size = int(getattr(vqgan, "codebook_size", 0) or vqgan.quantize.codebook_size)
    counts = torch.zeros(codebook_size, dtype=torch.int64)
    psnrs, lpipss, f_real, f_fake = [], [], [], []
    shown: list[torch.Tensor] = []
    progress({"event": "start", "task": "recon", "total": total, "unit": "img"})
    for x in batches:
        x = x.to(device).float()
        xrec, codes, _ = vqgan(x)  # [B,3,H,W], [B,h,w]
        xrec = xrec.clamp(0, 1)
        counts += torch.bincount(codes.flatten().cpu(), minlength=codebook_size)
        psnrs.append(psnr(x, xrec).cpu())
        if lpips_model is not None:
            lpipss.append(lpips_model(x, xrec, normalize=True).flatten().cpu())
        if extractor is not None:
            f_real.append(extractor(_to_uint8(x)))
            f_fake.append(extractor(_to_uint8(xrec)))
        have = sum(p.shape[1] for p in shown)
        if have < grid_images:
            take = min(x.shape[0], grid_images - have)
            shown.append(torch.stack([x[:take].cpu(), xrec[:take].cpu()]))  # [2,t,3,H,W]
        progress({"event": "advance", "task": "recon", "n": x.shape[0],
                  "metrics": {"psnr": float(torch.cat(psnrs).mean())}})
    progress({"event": "end", "task": "recon"})
    if not psnrs:
        raise UserError("the reconstruction split holds no images; check --data and --split")
    results: dict[str, Any] = {"n_images": int(torch.cat(psnrs).numel()), "psnr": float(torch.cat(psnrs).mean())}
    results["lpips"] = float(torch.cat(lpipss).mean()) if lpipss else None
    if extractor is not None:
        real, fake = torch.cat(f_real).numpy(), torch.cat(f_fake).numpy()
        results["rfid"] = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    else:
        results["rfid"] = None
    results.update(codebook_usage(counts))
    if grid_path is not None and shown:
        pairs = torch.cat(shown, dim=1)  # [2, G, 3, H, W]
        from uvq.images import save_grid

        save_grid(pairs.flatten(0, 1), grid_path, nrow=pairs.shape[1])
        results["grid"] = str(grid_path)
    return results


def replace_eval(cfg_eval, **changes):
    """An `EvalConfig` with some fields changed (those given as not None)."""
    return dataclasses.replace(cfg_eval, **{k: v for k, v in changes.items() if v is not None})


def evaluate_vqgan(checkpoint: str | Path, data: str, *, split: str = "val", batch_size: int = 32,
                   max_images: int | None = None, lpips_net: str | None = "vgg", cfg_eval=None,
                   device: torch.device | str = "cpu", grid_path: str | Path | None = None, weights: str = "default",
                   progress: ProgressFn | None = None) -> dict[str, Any]:
    """`uvq eval recon`: the VQGAN checkpoint's reconstruction metrics on a split of `data`.

    The split is the training run's own (its data.val_fraction, by key), images prepared at the
    VQGAN's size as in training. `lpips_net=None` skips LPIPS; `cfg_eval=None` skips rFID.
    """
    from uvq.checkpoint import load_model
    from uvq.config import DataConfig, section_from_dict
    from uvq.data import iterate_images

    progress = progress or null_progress
    device = torch.device(device)
    vqgan, meta = load_model(checkpoint, "vqgan", weights=weights, device=device)
    run_data = (meta.get("config") or {}).get("data")
    data_cfg = section_from_dict(DataConfig, run_data, "data") if run_data else DataConfig()
    data_cfg = dataclasses.replace(data_cfg, source=data, max_images=max_images, hflip=False)
    lpips_model = None
    if lpips_net is not None:
        from uvq.losses import load_lpips

        lpips_model = load_lpips(lpips_net, alternative="or pass --no-lpips").to(device)
    extractor = _build_extractor(cfg_eval, device) if cfg_eval is not None else None
    img_size = int(meta["model_config"]["img_size"])
    stream = iterate_images(data_cfg, img_size, split=split, batch_size=batch_size, progress=progress)
    results = evaluate_reconstruction(vqgan, (b["image"] for b in stream), device=device, lpips_model=lpips_model,
                                      extractor=extractor, grid_path=grid_path, progress=progress, total=stream.total)
    warnings = []
    if stream.stats.skipped:
        warnings.append(f"data: {stream.stats.skipped} unreadable image(s) skipped, e.g. {'; '.join(stream.stats.examples[:2])}")
    if lpips_model is None:
        warnings.append("LPIPS skipped (--no-lpips)")
    if extractor is None:
        warnings.append("reconstruction FID skipped (--no-fid)")
    for w in warnings:
        progress({"event": "warn", "message": w})
    return {
        REPORT_MARKER: "eval",
        "metrics": ["recon"],
        "results": results,
        "checkpoint": {"path": meta["path"], "weights_sha256": meta.get("weights_sha256"), "step": meta.get("step"),
                       "uvq_version": meta.get("uvq_version")},
        "data": {"source": data, "split": split, "val_fraction": data_cfg.val_fraction, "img_size": img_size,
                 "stats": stream.stats.to_dict()},
        "lpips": {"net": lpips_net, "version": "0.1"} if lpips_net else None,
        "extractor": extractor.describe() if extractor is not None else None,
        "device": str(device),
        "uvq_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "warnings": warnings,
    }
