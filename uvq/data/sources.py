"""Images in: the one source protocol, the one decode, the validation split, bad images.

Every stage that reads images (VQGAN training, encode, evaluation's feature sets, neighbours,
inpaint's inputs) goes through this module. A *source* says where images come from (registry
category "streams", one builder signature `fn(cfg: DataConfig) -> source`):

    folder.v1       a folder of images, recursive, each directory read once (symlink loops reported)
    webdataset.v1   tar shards: local paths, brace patterns, URLs or `pipe:` commands, as webdataset
                    accepts them, or a folder of .tar files
    demo.v1         the embedded, procedurally drawn demo set (uvq.data.demo)

Two shapes of source. *Indexable* ones (folder, demo, plugins alike) have `keys`, `origin(i)`,
`load(i, size)` (uint8 [3,S,S]) and `read(i)` (the encoded bytes); *stream* ones (shards) have
`urls`, `read(url)` (samples in file order) and `decode(members, size)`. `encoded_images` walks
either in order. Sources carry `warnings` (one line each) that whoever reads them reports.

Every image is decoded by `decode_image`: Pillow, `uvq.images.to_rgb`, then (for a size S)
torchvision's Resize(S) of the short side and CenterCrop(S) as the official loaders do. The
streams of batches built on top of this (ranks x workers, exact resume) are in uvq.data.streams.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import re
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from webdataset import gopen
from webdataset.shardlists import expand_urls

from uvq.config import DataConfig
from uvq.data.demo import demo_array, demo_key
from uvq.images import to_rgb
from uvq.registry import register, registry
from uvq.runtime import UserError

SPLITS = ("train", "val", "all")
MAX_EXAMPLES = 10  # bad-image messages kept in DataStats.examples

# The one list of image extensions, for folders and shard members alike, in the order a shard
# sample's image member is preferred: formats Pillow reads without extra programs.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "pnm", "bmp", "tif", "tiff", "gif")


def is_image_name(name: str) -> bool:
    """Whether a file or member name ends in one of IMAGE_EXTS (any case)."""
    return os.path.splitext(name)[1][1:].lower() in IMAGE_EXTS


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


def check_split(split: str) -> None:
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


def decode_image(fp, size: int | None) -> torch.Tensor:
    """A path, file object or bytes -> uint8 [3,H,W] RGB; raises BadImage.

    With `size`, H = W = size by resize_center_crop (the training transform); with None, the
    image's own size (what the evaluation's feature extractor takes).
    """
    if isinstance(fp, (bytes, bytearray)):
        fp = io.BytesIO(fp)
    im = open_image(fp)
    try:
        im = to_rgb(im)
        if size is not None:
            im = resize_center_crop(im, size)
        arr = np.asarray(im, dtype=np.uint8)  # [H,W,3]
    except Exception as exc:
        raise BadImage(f"{type(exc).__name__}: {exc}") from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [3,H,W]


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
# folder.v1: every image under a root, each directory read once
# ---------------------------------------------------------------------------------------------


def _walk_once(root: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(relative path, file name) of every visible file under `root`, following directory links
    but entering each directory once (by device and inode), and one warning per link skipped.

    os.walk(followlinks=True) alone enters a loop (a link to an ancestor) until the path is too
    long, so one loop multiplies the files about 40-fold and two hang; comparing st_dev/st_ino is
    how GNU find detects loops.
    """
    top = os.stat(root)
    seen = {(top.st_dev, top.st_ino)}
    files, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            full = os.path.join(dirpath, d)
            try:
                st = os.stat(full)
            except OSError:  # a dangling link: nothing to read
                continue
            if (st.st_dev, st.st_ino) in seen:
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                skipped.append(f"{root}/{rel} links to {os.path.realpath(full)}, which is already read "
                               "(a symlink loop or a second link): skipped")
                continue
            seen.add((st.st_dev, st.st_ino))
            keep.append(d)
        dirnames[:] = keep
        for fname in filenames:
            if not fname.startswith("."):
                files.append((os.path.relpath(os.path.join(dirpath, fname), root).replace(os.sep, "/"), fname))
    return files, skipped


class FolderSource:
    """Every image under `root` (recursive; hidden files and folders skipped), sorted by key.

    Keys are relative paths without the extension, with '/' separators. Files are recognised by
    IMAGE_EXTS (and, with `include`, a file-name pattern such as "sample-*"); whether they decode
    is found out when they are read. Each directory is entered once; links that would enter one
    again are listed in `warnings`.
    """

    name = "folder.v1"

    def __init__(self, root: str | Path, max_images: int | None = None, include: str | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"data.source {self.root} is not a directory")
        files, self.warnings = _walk_once(self.root)
        found: dict[str, str] = {}
        for rel, fname in files:
            if not is_image_name(fname) or (include is not None and not fnmatch.fnmatch(fname, include)):
                continue
            key = os.path.splitext(rel)[0]
            if key in found:
                raise UserError(f"images {found[key]} and {rel} in {self.root} have the same key {key!r} "
                                "(path without extension); rename one of them")
            found[key] = rel
        if not found:
            raise UserError(f"{self.root} holds no images (looked for {', '.join(IMAGE_EXTS)}); point it at a "
                            "folder or shards with images")
        self.keys = sorted(found)[:max_images]
        self.files = [found[k] for k in self.keys]

    def __len__(self) -> int:
        return len(self.keys)

    def origin(self, i: int) -> str:
        return str(self.root / self.files[i])

    def read(self, i: int) -> bytes:
        return (self.root / self.files[i]).read_bytes()

    def load(self, i: int, size: int) -> torch.Tensor:
        return decode_image(self.root / self.files[i], size)


# ---------------------------------------------------------------------------------------------
# demo.v1: the embedded demo set
# ---------------------------------------------------------------------------------------------


class DemoSource:
    """The first `n` images of the embedded demo set (uvq.data.demo), drawn at the requested size.

    `read(i)` gives image i as PNG bytes drawn at `size` (the evaluation's `demo:N@SIZE`).
    """

    name = "demo.v1"
    _CACHE_BYTES = 512 << 20  # draw each image once per process while the set fits in this

    def __init__(self, n: int, max_images: int | None = None, size: int = 32) -> None:
        self.n = min(n, max_images) if max_images else n
        self.size = size
        self.keys = [demo_key(i) for i in range(self.n)]
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self.warnings: list[str] = []

    def __len__(self) -> int:
        return self.n

    def origin(self, i: int) -> str:
        return f"demo image {i}"

    def read(self, i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(demo_array(i, self.size)).save(buf, format="PNG")
        return buf.getvalue()

    def load(self, i: int, size: int) -> torch.Tensor:
        arr = self._cache.get((i, size))
        if arr is None:
            arr = demo_array(i, size)  # [size,size,3]
            if self.n * arr.nbytes <= self._CACHE_BYTES:
                self._cache[(i, size)] = arr
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # [3,size,size]


# ---------------------------------------------------------------------------------------------
# webdataset.v1: tar shards, read as streams (never extracted to disk)
# ---------------------------------------------------------------------------------------------


def _tar_key_ext(name: str) -> tuple[str | None, str | None]:
    """webdataset's naming: the key is the path up to the first dot of the file name."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (None, None)


def unsafe_member(name: str) -> bool:
    """A tar member name that would leave the archive's folder if extracted: absolute, or with a
    '..' component (the tar path-traversal attack, CVE-2007-4559)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts


def _shard_files(folder: str) -> list[str]:
    return sorted(str(p) for p in Path(folder).glob("*.tar"))


class ShardSource:
    """webdataset tar shards. `spec` is expanded as webdataset does ('::' lists, braces, $WDS_ vars),
    or is a folder whose .tar files are the shards; shards are opened with webdataset's gopen, so
    local paths, URLs and 'pipe:' commands work.

    Samples are files grouped by key (webdataset's convention: path up to the first dot of the
    name, `__key__`); the image is the first member whose extension is in IMAGE_EXTS. A member
    whose name leaves the archive (unsafe_member) makes the shard bad from there on.
    """

    name = "webdataset.v1"

    def __init__(self, spec: str, max_images: int | None = None) -> None:
        self.spec = spec
        self.urls = _shard_files(spec) if os.path.isdir(spec) else expand_urls(spec)
        self.max_images = max_images
        self.warnings: list[str] = []
        if not self.urls:
            raise UserError(f"data.source {spec!r} expands to no shards")
        for url in self.urls:
            if "://" not in url and not url.startswith("pipe:") and url != "-" and not os.path.exists(url):
                raise UserError(f"webdataset shard {url} (from data.source {spec!r}) does not exist")

    def read(self, url: str) -> Iterator[tuple[str, str, Any]]:
        """Yield ('sample', key, {ext: bytes}) per sample, then ('bad_shard', url, message) if the
        shard is unreadable, truncated or hostile (the samples read before are still yielded)."""
        key, members = None, {}
        try:
            with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    name = info.name
                    if unsafe_member(name):
                        raise tarfile.ReadError(f"member name {name!r} leaves the archive (path traversal)")
                    k, ext = _tar_key_ext(name)
                    if not info.isreg() or k is None or os.path.basename(name).startswith("__"):
                        continue
                    data = tar.extractfile(info).read()
                    if k != key:
                        if members:
                            yield "sample", key, members
                        key, members = k, {}
                    members[ext] = data
                    tar.members = []  # streaming: do not keep every header in memory
                # tarfile ends quietly when a shard is cut at a header; a whole shard ends with a
                # zero block, so fewer than 512 bytes read at the final header means truncation.
                read_to = getattr(tar.fileobj, "pos", None)
                if read_to is not None and read_to - tar.offset < tarfile.BLOCKSIZE:
                    raise tarfile.ReadError("unexpected end of data (no end-of-archive block)")
        except Exception as exc:  # tarfile.ReadError, EOFError, OSError, zlib errors, a failed pipe
            if members:
                yield "sample", key, members
            yield "bad_shard", url, f"{type(exc).__name__}: {exc}"
            return
        if members:
            yield "sample", key, members

    @staticmethod
    def image_bytes(members: dict[str, bytes]) -> bytes:
        """The sample's image member (the first of IMAGE_EXTS it has); raises BadImage if none."""
        for ext in IMAGE_EXTS:
            if ext in members:
                return members[ext]
        raise BadImage(f"no image member (one of {', '.join(IMAGE_EXTS)}) in sample "
                       f"with members {', '.join(sorted(members)) or 'none'}")

    @staticmethod
    def decode(members: dict[str, bytes], size: int) -> torch.Tensor:
        return decode_image(ShardSource.image_bytes(members), size)


# ---------------------------------------------------------------------------------------------
# The registry entries and choosing one from data.source
# ---------------------------------------------------------------------------------------------


@register("streams", "folder.v1")
def build_folder_source(cfg: DataConfig) -> FolderSource:
    return FolderSource(cfg.source, max_images=cfg.max_images)


@register("streams", "demo.v1")
def build_demo_source(cfg: DataConfig) -> DemoSource:
    return DemoSource(cfg.demo_images, max_images=cfg.max_images)


@register("streams", "webdataset.v1")
def build_webdataset_source(cfg: DataConfig) -> ShardSource:
    return ShardSource(cfg.source, max_images=cfg.max_images)


def _holds_only_shards(folder: str) -> bool:
    """A folder with .tar files at its top and no image anywhere under it."""
    if not _shard_files(folder):
        return False
    return not any(is_image_name(f) for _, _, files in os.walk(folder) for f in files)


def resolve_stream(cfg: DataConfig) -> str:
    """The stream name for `cfg`: cfg.stream, or for 'auto' a choice from the shape of cfg.source."""
    if cfg.stream != "auto":
        return cfg.stream
    source = str(cfg.source)
    if source == "demo":
        return "demo.v1"
    if os.path.isdir(source):
        return "webdataset.v1" if _holds_only_shards(source) else "folder.v1"
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


def is_indexable(source) -> bool:
    return hasattr(source, "load") and hasattr(source, "keys")


def encoded_images(source, indices: set[int] | None = None) -> Iterator[tuple[int, str, str, bytes]]:
    """(position, key, origin, encoded bytes) of every sample in order, once; with `indices`, only
    those positions. Bytes that cannot be read come as b"" (decoding then fails and is counted);
    a damaged shard is a UserError (a set that is evaluated must be read whole)."""
    if is_indexable(source):
        for i in (range(len(source.keys)) if indices is None else sorted(indices)):
            try:
                data = source.read(i)
            except OSError:
                data = b""
            yield i, source.keys[i], source.origin(i), data
        return
    pos = 0
    for url in source.urls:
        for kind, key, payload in source.read(url):
            if kind == "bad_shard":
                raise UserError(f"webdataset shard {url} cannot be read ({payload}); check the file or remove it "
                                "from the set")
            if indices is None or pos in indices:
                try:
                    data = source.image_bytes(payload)
                except BadImage:
                    data = b""
                yield pos, key, f"{url}:{key}", data
            pos += 1
