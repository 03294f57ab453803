"""Images in: sources, transforms, the validation split, bad images, ranks x workers, exact resume.

A *source* says where images come from (registry category "streams"):

    folder.v1       a folder of images, recursive, any format Pillow reads
    webdataset.v1   tar shards: local paths, brace patterns or URLs, as webdataset accepts them
    demo.v1         the embedded, procedurally drawn demo set (uvq.data.demo)

Every image becomes FloatTensor [3,S,S] in [0,1] exactly as the official loaders make it
(torchvision Resize(S) of the short side, CenterCrop(S), ToTensor), with an optional random
horizontal flip while training. Two ways to read:

    train_batches(...)   an infinite, reshuffled, resumable stream of training batches
    iterate_images(...)  one deterministic pass in key order (encoding, evaluation)

Work is split across torchrun ranks and DataLoader workers with no duplicates and no omissions.
Decoding runs in the workers; everything that needs state (batching, flips, counting bad images,
the data position) runs in the main process, which is what makes resuming exact. That reading
machinery (webdataset shards, ranks x workers, the streams themselves) is in uvq.data.streams; this
module holds sources, transforms, the split and the bad-image policy, and the entry points.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from uvq.config import DataConfig
from uvq.data.demo import demo_array, demo_key
from uvq.images import to_rgb
from uvq.progress import ProgressFn, null_progress
from uvq.registry import register, registry
from uvq.runtime import UserError, dist_info

if TYPE_CHECKING:  # uvq.data.streams imports this module; the entry points import it when called
    from uvq.data.streams import ImagePass, TrainStream

SPLITS = ("train", "val", "all")
MAX_EXAMPLES = 10  # bad-image messages kept in DataStats.examples


# ---------------------------------------------------------------------------------------------
# The validation split: deterministic by key, so every stage and every rank agree
# ---------------------------------------------------------------------------------------------


def key_fraction(key: str) -> float:
    """A uniform number in [0,1) fixed by the key alone (sha256 of the key)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def in_split(key: str, split: str, val_fraction: float) -> bool:
    """Whether `key` belongs to `split`: 'val' holds keys whose key_fraction < val_fraction."""
    if split == "all":
        return True
    is_val = key_fraction(key) < val_fraction
    return is_val if split == "val" else not is_val


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown data split {split!r}; use one of {', '.join(SPLITS)}")


# ---------------------------------------------------------------------------------------------
# Decoding and transforms (the official loaders: Resize(S), CenterCrop(S), ToTensor)
# ---------------------------------------------------------------------------------------------


class BadImage(Exception):
    """An image that cannot be used: unreadable, corrupt, truncated, or absurdly large."""


def open_image(fp) -> Image.Image:
    """Open and fully decode an image, or raise BadImage.

    Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) is checked from the header before
    any pixel is decoded; unlike Pillow's default (a warning up to twice the limit) every image
    over the limit is refused, so an absurd image never exhausts memory.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
        limit = Image.MAX_IMAGE_PIXELS
        if limit and im.width * im.height > limit:
            raise BadImage(f"{im.width}x{im.height} pixels exceeds Pillow's decompression-bomb limit "
                           f"Image.MAX_IMAGE_PIXELS={limit}")
        im.load()  # decode now: truncated and corrupt files fail here, not later
        return im
    except BadImage:
        raise
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadImage(f"{type(exc).__name__}: {exc}") from exc


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (bilinear) and take the central size x size crop.

    The arithmetic is torchvision's Resize(size) followed by CenterCrop(size), which the
    official loaders use: long side int(size * long / short), crop offset round((L - size) / 2).
    """
    w, h = im.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def decode_image(fp, size: int) -> torch.Tensor:
    """A path, file object or bytes -> uint8 [3,size,size] (RGB); raises BadImage."""
    if isinstance(fp, (bytes, bytearray)):
        fp = io.BytesIO(fp)
    im = open_image(fp)
    try:
        im = resize_center_crop(to_rgb(im), size)
        arr = np.asarray(im, dtype=np.uint8)  # [size,size,3]
    except Exception as exc:
        raise BadImage(f"{type(exc).__name__}: {exc}") from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [3,size,size]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [...,3,H,W] -> float in [0,1] (ToTensor's x / 255)."""
    return images.float().div_(255.0)


# ---------------------------------------------------------------------------------------------
# Bad-image statistics (the training loop puts them in its run summary)
# ---------------------------------------------------------------------------------------------


@dataclass
class DataStats:
    """Counts of what a stream read: `seen` samples, `skipped` bad ones, truncated `bad_shards`."""

    seen: int = 0
    skipped: int = 0
    examples: list[str] = field(default_factory=list)  # the first MAX_EXAMPLES problems, one line each
    bad_shards: list[str] = field(default_factory=list)  # each truncated or unreadable shard once

    def to_dict(self) -> dict:
        return {"seen": self.seen, "skipped": self.skipped, "examples": list(self.examples),
                "bad_shards": list(self.bad_shards)}

    def load_dict(self, d: dict) -> None:
        self.seen, self.skipped = int(d["seen"]), int(d["skipped"])
        self.examples, self.bad_shards = list(d["examples"]), list(d["bad_shards"])

    def _note(self, message: str) -> None:
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(message)


# ---------------------------------------------------------------------------------------------
# Sources: folder.v1, demo.v1 (indexable) and webdataset.v1 (shards, read as streams)
# ---------------------------------------------------------------------------------------------


def _pillow_extensions() -> frozenset[str]:
    Image.init()
    return frozenset(ext.lower() for ext in Image.registered_extensions())


class FolderSource:
    """Every image under `root` (recursive; hidden files and folders skipped), sorted by key.

    Keys are relative paths without the extension, with '/' separators. Files are recognised by
    the extensions Pillow registers; whether they decode is found out when they are read.
    """

    name = "folder.v1"

    def __init__(self, root: str | Path, max_images: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"data.source {self.root} is not a directory")
        exts = _pillow_extensions()
        found: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fname in filenames:
                if fname.startswith(".") or os.path.splitext(fname)[1].lower() not in exts:
                    continue
                rel = os.path.relpath(os.path.join(dirpath, fname), self.root).replace(os.sep, "/")
                key = os.path.splitext(rel)[0]
                if key in found:
                    raise UserError(f"images {found[key]} and {rel} in {self.root} have the same key {key!r} "
                                    "(path without extension); rename one of them")
                found[key] = rel
        if not found:
            tars = sorted(p.name for p in self.root.glob("*.tar"))
            hint = (f"; it holds tar shards, so give them as a brace pattern such as {self.root}/{{...}}.tar"
                    if tars else "")
            raise UserError(f"no images found in folder {self.root}{hint}")
        self.keys = sorted(found)[:max_images]
        self.files = [found[k] for k in self.keys]

    def __len__(self) -> int:
        return len(self.keys)

    def origin(self, i: int) -> str:
        return str(self.root / self.files[i])

    def load(self, i: int, size: int) -> torch.Tensor:
        return decode_image(self.root / self.files[i], size)


class DemoSource:
    """The first `n` images of the embedded demo set (uvq.data.demo), drawn at the requested size."""

    name = "demo.v1"
    _CACHE_BYTES = 512 << 20  # draw each image once per process while the set fits in this

    def __init__(self, n: int, max_images: int | None = None) -> None:
        self.n = min(n, max_images) if max_images else n
        self.keys = [demo_key(i) for i in range(self.n)]
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.n

    def origin(self, i: int) -> str:
        return f"demo image {i}"

    def load(self, i: int, size: int) -> torch.Tensor:
        arr = self._cache.get((i, size))
        if arr is None:
            arr = demo_array(i, size)  # [size,size,3]
            if self.n * arr.nbytes <= self._CACHE_BYTES:
                self._cache[(i, size)] = arr
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # [3,size,size]



@register("streams", "folder.v1")
def build_folder_source(cfg: DataConfig) -> FolderSource:
    return FolderSource(cfg.source, max_images=cfg.max_images)


@register("streams", "demo.v1")
def build_demo_source(cfg: DataConfig) -> DemoSource:
    return DemoSource(cfg.demo_images, max_images=cfg.max_images)


def resolve_stream(cfg: DataConfig) -> str:
    """The stream name for `cfg`: cfg.stream, or for 'auto' a choice from the shape of cfg.source."""
    if cfg.stream != "auto":
        return cfg.stream
    source = str(cfg.source)
    if source == "demo":
        return "demo.v1"
    if os.path.isdir(source):
        return "folder.v1"
    if ".tar" in source or re.search(r"\{.*\}", source) or "://" in source or source.startswith("pipe:"):
        return "webdataset.v1"
    if not os.path.exists(source):
        raise UserError(f"data.source {source} does not exist; give 'demo', an image folder, or webdataset "
                        "shards (.tar paths, a brace pattern such as data-{000..009}.tar, or a URL)")
    raise UserError(f"data.source {source} is a file, not a folder of images or a .tar shard; "
                    "give its folder, or set data.stream explicitly")


def build_source(cfg: DataConfig):
    """Build the source that cfg names (through the registry, so plugins can add streams)."""
    return registry.get("streams", resolve_stream(cfg))(cfg)


def _indexable(source) -> bool:
    return hasattr(source, "load") and hasattr(source, "keys")



# ---------------------------------------------------------------------------------------------
# Reading: the entry points (TrainStream and ImagePass are in uvq.data.streams)
# ---------------------------------------------------------------------------------------------


def train_batches(cfg: DataConfig, img_size: int, batch_size: int, *, seed: int, rank: int | None = None,
                  world_size: int | None = None, split: str = "train", progress: ProgressFn | None = None
                  ) -> TrainStream:
    """An infinite stream of training batches {"key": list[str], "image": FloatTensor[B,3,S,S]}.

    Images are resized (short side to img_size), center-cropped, flipped at random when cfg.hflip,
    and in [0,1]. Each epoch is a fresh shuffle from (seed, epoch); this rank (default: the
    torch.distributed rank) sees only its share, with no example on two ranks or two workers.
    Decoding uses cfg.num_workers DataLoader workers. Bad images are skipped (counted in
    `stream.stats`, warned through `progress`) or, with cfg.strict, raise UserError.
    `stream.state_dict()` / `load_state_dict()` resume exactly (see TrainStream).
    """
    from uvq.data.streams import TrainStream

    _check_split(split)
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    dist = dist_info()
    rank = dist.rank if rank is None else rank
    world_size = dist.world_size if world_size is None else world_size
    return TrainStream(build_source(cfg), img_size, batch_size, seed=seed, rank=rank, world_size=world_size,
                       split=split, val_fraction=cfg.val_fraction, hflip=cfg.hflip, num_workers=cfg.num_workers,
                       strict=cfg.strict, shuffle_buffer=cfg.shuffle_buffer, progress=progress or null_progress)


def iterate_images(cfg: DataConfig, img_size: int, *, split: str, batch_size: int, rank: int | None = None,
                   world_size: int | None = None, progress: ProgressFn | None = None) -> ImagePass:
    """One deterministic pass over `split` ('train', 'val' or 'all'): batches {"key", "image"}.

    No flip, no shuffle; images are resized and center-cropped to img_size, values in [0,1].
    Batches are full except the last. This rank (default: the torch.distributed rank) reads only
    its share. Any folder of images works as cfg.source (e.g. generated samples for evaluation).
    Bad images follow cfg.strict as in train_batches; the returned ImagePass has `.stats` and
    `.total`.
    """
    from uvq.data.streams import ImagePass

    _check_split(split)
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    dist = dist_info()
    rank = dist.rank if rank is None else rank
    world_size = dist.world_size if world_size is None else world_size
    return ImagePass(build_source(cfg), img_size, batch_size, split=split, val_fraction=cfg.val_fraction,
                     rank=rank, world_size=world_size, num_workers=cfg.num_workers, strict=cfg.strict,
                     progress=progress or null_progress)


def count_images(cfg: DataConfig, *, split: str = "all", rank: int | None = None,
                 world_size: int | None = None) -> int | None:
    """How many images iterate_images would offer this rank (before bad ones are skipped).

    Cheap for folder and demo sources (no image is opened); None for webdataset shards, whose
    length is only known by reading them.
    """
    _check_split(split)
    dist = dist_info()
    rank = dist.rank if rank is None else rank
    world_size = dist.world_size if world_size is None else world_size
    source = build_source(cfg)
    if not _indexable(source):
        return None
    n = sum(in_split(k, split, cfg.val_fraction) for k in source.keys)
    return len(range(rank, n, world_size))
