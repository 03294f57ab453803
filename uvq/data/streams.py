"""Reading images as batches: ranks x DataLoader workers, the training stream and one pass.

Built on the sources of uvq.data.sources (this module imports that one, never the reverse).
Every image becomes FloatTensor [3,S,S] in [0,1] exactly as the official loaders make it
(torchvision Resize(S) of the short side, CenterCrop(S), ToTensor), with an optional random
horizontal flip while training. Two ways to read:

    train_batches(...)   an infinite, reshuffled, resumable stream of training batches (TrainStream)
    iterate_images(...)  one deterministic pass in key order (encoding, evaluation; ImagePass)
    count_images(...)    how many images a pass would offer, without opening any

Work is split across torchrun ranks and DataLoader workers with no duplicates and no omissions
(shard_assignment). Workers decode images into chunks; the main process unpacks them, applies
the bad-image policy (skip, count and warn, or raise under data.strict), flips and batches, so
that the data position it keeps makes resuming exact.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from uvq.config import DataConfig
from uvq.data.sources import (
    BadImage,
    DataStats,
    ShardSource,
    build_source,
    check_split,
    in_split,
    is_indexable,
    to_float,
)
from uvq.progress import ProgressFn, null_progress
from uvq.runtime import UserError, dist_info


def _mix(*parts: Any) -> int:
    """A 63-bit seed from any values, stable across processes and Python versions (not hash())."""
    digest = hashlib.sha256(("uvq-data:" + ":".join(map(str, parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


# ---------------------------------------------------------------------------------------------
# Splitting the work: ranks x DataLoader workers ("slots"), with no duplicates or omissions
# ---------------------------------------------------------------------------------------------


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def shard_assignment(n_shards: int, slots: int, slot: int) -> tuple[list[int], int | None]:
    """Which shards slot `slot` of `slots` reads, and whether it then keeps every slots-th sample.

    With at least as many shards as slots, shards are dealt out (slot s reads shards s, s+slots,
    ...) and every sample of a read shard is kept. With fewer shards every slot reads all shards
    and keeps samples whose running index i (over the split, in shard order) has i % slots == s.
    Either way each sample goes to exactly one slot.
    """
    if n_shards >= slots:
        return list(range(slot, n_shards, slots)), None
    return list(range(n_shards)), slot


# ---------------------------------------------------------------------------------------------
# Record streams: what each DataLoader worker (or the main process) runs
# ---------------------------------------------------------------------------------------------
#
# A worker yields *chunks*: {"worker", "keys", "origins", "errors", "images"}, where errors[j] is
# None for a good image and images stacks the good ones as uint8 [n_good,3,S,S] (one tensor per
# chunk keeps shared-memory handles few). Shard streams also yield {"bad_shard": url, "error"}.


def _chunk(worker: int, items: list[tuple[str, str, Any]], size: int, load) -> dict:
    keys, origins, errors, images = [], [], [], []
    for key, origin, ref in items:
        try:
            images.append(load(ref, size))
            errors.append(None)
        except BadImage as exc:
            errors.append(str(exc))
        keys.append(key)
        origins.append(origin)
    stacked = torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return {"worker": worker, "keys": keys, "origins": origins, "errors": errors, "images": stacked}


class _TrainOrder:
    """Position p of rank r's training sequence -> (epoch, one of `items`).

    The global sequence is epoch 0's permutation, then epoch 1's, ... (each from (seed, epoch));
    rank r takes global positions r, r + W, r + 2W, ... so ranks never overlap within an epoch.
    """

    def __init__(self, items: list[int], seed: int, rank: int, world_size: int) -> None:
        self.items, self.n, self.seed, self.rank, self.world_size = items, len(items), seed, rank, world_size
        self._perm: tuple[int, torch.Tensor] | None = None

    def __call__(self, p: int) -> tuple[int, int]:
        g = p * self.world_size + self.rank
        epoch, i = divmod(g, self.n)
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(_mix(self.seed, "epoch", epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=gen))
        return epoch, self.items[int(self._perm[1][i])]


class _IndexedStream(torch.utils.data.IterableDataset):
    """Positions start, start+1, ... of an order, in chunks; worker w makes chunks c = w mod workers.

    DataLoader takes chunks from its workers in turn, so chunks arrive in position order whatever
    the number of workers. `order(p)` returns (epoch, item) or None past the end.
    """

    def __init__(self, source, size: int, order, start: int, chunk: int) -> None:
        self.source, self.size, self.order, self.start, self.chunk = source, size, order, start, chunk

    def __iter__(self):
        worker, workers = _worker()
        c = worker
        while True:
            items = []
            for p in range(self.start + c * self.chunk, self.start + (c + 1) * self.chunk):
                at = self.order(p)
                if at is None:
                    break
                i = at[1]
                items.append((self.source.keys[i], self.source.origin(i), i))
            if not items:
                return
            yield _chunk(worker, items, self.size, self.source.load)
            c += workers


class _PassOrder:
    """Position p -> the p-th of a fixed list of items (one pass; None past the end)."""

    def __init__(self, items: list[int]) -> None:
        self.items = items

    def __call__(self, p: int) -> tuple[int, int] | None:
        return (0, self.items[p]) if p < len(self.items) else None


def _shuffled(items, rng: random.Random, buffer: int):
    """webdataset-style shuffle buffer; ('bad_shard', ...) notices pass straight through."""
    buf: list = []
    for item in items:
        if item[0] == "bad_shard":
            yield item
            continue
        buf.append(item)
        if len(buf) >= buffer:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class _ShardStream(torch.utils.data.IterableDataset):
    """One epoch of webdataset samples for one rank; each worker reads its slot (shard_assignment).

    Per slot: shards (in an order shuffled from (seed, epoch) when training) -> split filter ->
    slot filter -> cap -> shuffle buffer (seeded from (seed, epoch, slot)) -> skip the samples
    already consumed (resume) -> decode in chunks.
    """

    def __init__(self, source: ShardSource, size: int, *, split: str, val_fraction: float, rank: int,
                 world_size: int, epoch: int, seed: int, shuffle: bool, shuffle_buffer: int,
                 skip: list[int], chunk: int) -> None:
        self.source, self.size, self.split, self.val_fraction = source, size, split, val_fraction
        self.rank, self.world_size, self.epoch, self.seed = rank, world_size, epoch, seed
        self.shuffle, self.shuffle_buffer, self.skip, self.chunk = shuffle, shuffle_buffer, skip, chunk

    def _samples(self, slot: int, slots: int):
        urls = list(self.source.urls)
        if self.shuffle:
            random.Random(_mix(self.seed, "shards", self.epoch)).shuffle(urls)
        mine, modulo = shard_assignment(len(urls), slots, slot)
        running, kept = 0, 0
        cap = None if self.source.max_images is None else max(1, self.source.max_images // slots)
        for j in mine:
            for kind, key, payload in self.source.read(urls[j]):
                if kind == "bad_shard":
                    if modulo is None or j % slots == slot:  # one slot reports each damaged shard
                        yield kind, key, payload
                    continue
                if not in_split(key, self.split, self.val_fraction):
                    continue
                if modulo is not None:
                    running += 1
                    if (running - 1) % slots != modulo:
                        continue
                if cap is not None and kept >= cap:
                    return
                kept += 1
                yield kind, key, (urls[j], payload)

    def __iter__(self):
        worker, workers = _worker()
        slots = self.world_size * workers
        slot = self.rank * workers + worker
        samples = self._samples(slot, slots)
        if self.shuffle:
            samples = _shuffled(samples, random.Random(_mix(self.seed, "buffer", self.epoch, slot)),
                                self.shuffle_buffer)
        to_skip = self.skip[worker] if worker < len(self.skip) else 0
        items = []
        for kind, key, payload in samples:
            if kind == "bad_shard":
                yield {"worker": worker, "bad_shard": key, "error": payload}
                continue
            if to_skip > 0:
                to_skip -= 1
                continue
            url, members = payload
            items.append((key, f"{url}:{key}", members))
            if len(items) == self.chunk:
                yield _chunk(worker, items, self.size, self.source.decode)
                items = []
        if items:
            yield _chunk(worker, items, self.size, self.source.decode)


def _keep(x):
    return x


def _loader(dataset, num_workers: int):
    """Chunks of `dataset`, from DataLoader workers when num_workers > 0, else in this process."""
    if num_workers == 0:
        return iter(dataset)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                            collate_fn=_keep, prefetch_factor=2))


# ---------------------------------------------------------------------------------------------
# Batching in the main process: counts, warnings, strict mode
# ---------------------------------------------------------------------------------------------


class _Records:
    """Unpacks chunks into records (worker, key, origin, image | None, error | None), applying the
    bad-image policy as each record is taken: warn and count, or raise under strict."""

    def __init__(self, stats: DataStats, strict: bool, progress: ProgressFn) -> None:
        self.stats, self.strict, self.progress = stats, strict, progress
        self.pending: deque = deque()

    def push(self, chunk: dict) -> None:
        if "bad_shard" in chunk:
            url, error = chunk["bad_shard"], chunk["error"]
            if self.strict:
                raise UserError(f"webdataset shard {url} is truncated or unreadable ({error}); "
                                "repair or remove it, or set data.strict=false to use its readable samples")
            if url not in self.stats.bad_shards:
                self.stats.bad_shards.append(url)
                self.stats._note(f"{url}: truncated or unreadable shard ({error})")
                self.progress({"event": "warn", "message": f"shard {url} is truncated or unreadable ({error}); "
                                                           "using the samples before the damage"})
            return
        good = iter(chunk["images"])
        for key, origin, error in zip(chunk["keys"], chunk["origins"], chunk["errors"], strict=True):
            self.pending.append((chunk["worker"], key, origin, None if error else next(good), error))

    def take(self):
        """The next record, after counting it; None for a skipped bad image."""
        worker, key, origin, image, error = self.pending.popleft()
        self.stats.seen += 1
        if error is None:
            return worker, key, image
        if self.strict:
            raise UserError(f"unreadable image {origin} ({error}); fix or remove it, "
                            "or set data.strict=false to skip bad images")
        self.stats.skipped += 1
        self.stats._note(f"{origin}: {error}")
        self.progress({"event": "warn", "message": f"skipped unreadable image {origin} ({error})"})
        return worker, key, None


def _flip(images: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """Random horizontal flip of each [3,H,W] image with probability 1/2 (from `gen`, in the main process)."""
    flip = (torch.rand(len(images), generator=gen) < 0.5).tolist()  # [B]
    return [im.flip(-1) if f else im for im, f in zip(images, flip, strict=True)]


# ---------------------------------------------------------------------------------------------
# Training: an infinite, reshuffled, exactly resumable stream of batches
# ---------------------------------------------------------------------------------------------


class TrainStream:
    """Infinite iterator of {"key": list[str], "image": FloatTensor[B,3,S,S]} (see train_batches).

    `state_dict()` is the data position; loading it into a fresh stream built with the same
    arguments continues with exactly the batches an uninterrupted stream would have produced
    (folder and demo sources always; webdataset sources with num_workers=0, see docs/data.md).
    """

    def __init__(self, source, img_size: int, batch_size: int, *, seed: int, rank: int, world_size: int,
                 split: str, val_fraction: float, hflip: bool, num_workers: int, strict: bool,
                 shuffle_buffer: int, progress: ProgressFn) -> None:
        self.source, self.img_size, self.batch_size = source, img_size, batch_size
        self.seed, self.rank, self.world_size, self.split = seed, rank, world_size, split
        self.val_fraction, self.hflip, self.num_workers = val_fraction, hflip, num_workers
        self.shuffle_buffer, self.progress = shuffle_buffer, progress
        self.stats = DataStats()
        self._records = _Records(self.stats, strict, progress)
        self._flip_gen = torch.Generator().manual_seed(_mix(seed, "flip", rank))
        self._chunks: Iterator | None = None
        self.indexed = is_indexable(source)
        if self.indexed:
            self.items = [i for i, k in enumerate(source.keys) if in_split(k, split, val_fraction)]
            if not self.items:
                raise UserError(f"the {split} split of {source.name} data is empty "
                                f"(val_fraction={val_fraction}, {len(source)} images)")
            self.position = 0  # records of this rank's sequence taken so far
        else:
            self.epoch = 0
            self.consumed = [0] * max(1, num_workers)  # records taken from each worker this epoch
            self._epoch_good = 0

    @property
    def n_images(self) -> int | None:
        """Images in the split (None for webdataset, whose length is unknown until read)."""
        return len(self.items) if self.indexed else None

    @property
    def current_epoch(self) -> int:
        if self.indexed:
            return (self.position * self.world_size + self.rank) // len(self.items)
        return self.epoch

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict:
        keys, images, bad_run = [], [], 0
        while len(images) < self.batch_size:
            worker, key, image = self._take()
            if image is None:
                bad_run += 1
                if self.indexed and bad_run >= len(self.items):  # a whole epoch's worth: none is readable
                    raise UserError(f"no readable images in the {self.split} split of {self.source.name} data "
                                    f"({bad_run} bad in a row); see the warnings above")
                continue
            bad_run = 0
            keys.append(key)
            images.append(image)
        if self.hflip:
            images = _flip(images, self._flip_gen)
        return {"key": keys, "image": to_float(torch.stack(images))}  # [B,3,S,S]

    def _take(self):
        while not self._records.pending:
            if self._chunks is None:
                self._chunks = self._open()
            try:
                self._records.push(next(self._chunks))
            except StopIteration:  # only shard streams end: start the next epoch
                if self._epoch_good == 0:
                    raise UserError(f"no readable images in the {self.split} split of data.source "
                                    f"{self.source.spec!r} in epoch {self.epoch}") from None
                self.epoch, self.consumed, self._epoch_good = self.epoch + 1, [0] * len(self.consumed), 0
                self._chunks = None
        worker, key, image = self._records.take()
        if self.indexed:
            self.position += 1
        else:
            self.consumed[worker] += 1
            self._epoch_good += image is not None
        return worker, key, image

    def _open(self) -> Iterator:
        chunk = min(self.batch_size, 64)
        if self.indexed:
            order = _TrainOrder(self.items, self.seed, self.rank, self.world_size)
            dataset = _IndexedStream(self.source, self.img_size, order, self.position, chunk)
        else:
            dataset = _ShardStream(self.source, self.img_size, split=self.split, val_fraction=self.val_fraction,
                                   rank=self.rank, world_size=self.world_size, epoch=self.epoch, seed=self.seed,
                                   shuffle=True, shuffle_buffer=self.shuffle_buffer, skip=list(self.consumed),
                                   chunk=chunk)
        return _loader(dataset, self.num_workers)

    # resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The data position, flip RNG and bad-image counts (plain values; torch.load-safe)."""
        state = {"kind": "indexed" if self.indexed else "shards", "seed": self.seed,
                 "world_size": self.world_size, "num_workers": self.num_workers,
                 "flip_rng": self._flip_gen.get_state(), "stats": self.stats.to_dict(),
                 "epoch": self.current_epoch}
        if self.indexed:
            state["position"], state["n_images"] = self.position, len(self.items)
        else:
            state["consumed"] = list(self.consumed)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from state_dict of a stream with the same source and arguments)."""
        kind = "indexed" if self.indexed else "shards"
        if state["kind"] != kind:
            raise UserError(f"the saved data position is for a {state['kind']} source but data.source is "
                            f"{self.source.name}; resume with the data the run was started with")
        self._close_loader()
        self._records.pending.clear()
        self._flip_gen.set_state(state["flip_rng"])
        self.stats.load_dict(state["stats"])
        same_layout = state["world_size"] == self.world_size
        if self.indexed:
            # Positions are per rank; with another number of ranks, keep the global count of samples.
            position, saved_world = state["position"], state["world_size"]
            self.position = position if same_layout else position * saved_world // self.world_size
            if state["n_images"] != len(self.items):
                self.progress({"event": "warn", "message": f"the {self.split} split has {len(self.items)} images "
                                                           f"but had {state['n_images']} when the data position was "
                                                           "saved: resuming at the same position of a new shuffle"})
        else:
            same_layout = same_layout and state["num_workers"] == self.num_workers
            self.epoch = state["epoch"]
            self.consumed = list(state["consumed"]) if same_layout else [0] * max(1, self.num_workers)
            self._epoch_good = sum(self.consumed)
        if not same_layout:
            self.progress({"event": "warn", "message": "resuming with a different number of ranks or data workers: "
                                                       "the data position is approximate"})

    def _close_loader(self) -> None:
        self._chunks = None  # dropping the DataLoader iterator shuts its workers down

    def close(self) -> None:
        self._close_loader()



# ---------------------------------------------------------------------------------------------
# One pass: encoding and evaluation
# ---------------------------------------------------------------------------------------------


class ImagePass:
    """An iterator of {"key": list[str], "image": FloatTensor[B,3,S,S]} over one split, once.

    Folder and demo sources come in key order (rank r takes the r-th, (r+W)-th, ... keys);
    webdataset sources in shard order. `total` is the number of images this rank will read
    (None for webdataset); `stats` counts bad images as they are skipped.
    """

    def __init__(self, source, img_size: int, batch_size: int, *, split: str, val_fraction: float, rank: int,
                 world_size: int, num_workers: int, strict: bool, progress: ProgressFn) -> None:
        self.stats = DataStats()
        self.batch_size = batch_size
        self._records = _Records(self.stats, strict, progress)
        chunk = min(batch_size, 64)
        if is_indexable(source):
            items = [i for i, k in enumerate(source.keys) if in_split(k, split, val_fraction)][rank::world_size]
            self.total: int | None = len(items)
            dataset = _IndexedStream(source, img_size, _PassOrder(items), 0, chunk)
        else:
            self.total = None
            dataset = _ShardStream(source, img_size, split=split, val_fraction=val_fraction, rank=rank,
                                   world_size=world_size, epoch=0, seed=0, shuffle=False, shuffle_buffer=1,
                                   skip=[], chunk=chunk)
        self._chunks = _loader(dataset, num_workers)
        self._done = False

    def __iter__(self) -> ImagePass:
        return self

    def __next__(self) -> dict:
        keys, images = [], []
        while len(images) < self.batch_size and not self._done:
            if not self._records.pending:
                try:
                    self._records.push(next(self._chunks))
                except StopIteration:
                    self._done = True
                continue
            _, key, image = self._records.take()
            if image is not None:
                keys.append(key)
                images.append(image)
        if not images:
            raise StopIteration
        return {"key": keys, "image": to_float(torch.stack(images))}  # [B,3,S,S]


# ---------------------------------------------------------------------------------------------
# The entry points
# ---------------------------------------------------------------------------------------------


def _opened(cfg: DataConfig, split: str, batch_size: int, rank: int | None, world_size: int | None,
            progress: ProgressFn) -> tuple[Any, int, int]:
    """Check the request, build the source and report its warnings (e.g. symlink loops skipped)."""
    check_split(split)
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    dist = dist_info()
    source = build_source(cfg)
    for message in getattr(source, "warnings", ()):
        progress({"event": "warn", "message": message})
    return source, dist.rank if rank is None else rank, dist.world_size if world_size is None else world_size


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
    progress = progress or null_progress
    source, rank, world_size = _opened(cfg, split, batch_size, rank, world_size, progress)
    return TrainStream(source, img_size, batch_size, seed=seed, rank=rank, world_size=world_size,
                       split=split, val_fraction=cfg.val_fraction, hflip=cfg.hflip, num_workers=cfg.num_workers,
                       strict=cfg.strict, shuffle_buffer=cfg.shuffle_buffer, progress=progress)


def iterate_images(cfg: DataConfig, img_size: int, *, split: str, batch_size: int, rank: int | None = None,
                   world_size: int | None = None, progress: ProgressFn | None = None) -> ImagePass:
    """One deterministic pass over `split` ('train', 'val' or 'all'): batches {"key", "image"}.

    No flip, no shuffle; images are resized and center-cropped to img_size, values in [0,1].
    Batches are full except the last. This rank (default: the torch.distributed rank) reads only
    its share. Any folder of images works as cfg.source (e.g. generated samples for evaluation).
    Bad images follow cfg.strict as in train_batches; the returned ImagePass has `.stats` and
    `.total`.
    """
    progress = progress or null_progress
    source, rank, world_size = _opened(cfg, split, batch_size, rank, world_size, progress)
    return ImagePass(source, img_size, batch_size, split=split, val_fraction=cfg.val_fraction,
                     rank=rank, world_size=world_size, num_workers=cfg.num_workers, strict=cfg.strict,
                     progress=progress)


def count_images(cfg: DataConfig, *, split: str = "all", rank: int | None = None,
                 world_size: int | None = None) -> int | None:
    """How many images iterate_images would offer this rank (before bad ones are skipped).

    Cheap for folder and demo sources (no image is opened); None for webdataset shards, whose
    length is only known by reading them.
    """
    check_split(split)
    dist = dist_info()
    rank = dist.rank if rank is None else rank
    world_size = dist.world_size if world_size is None else world_size
    source = build_source(cfg)
    if not is_indexable(source):
        return None
    n = sum(in_split(k, split, cfg.val_fraction) for k in source.keys)
    return len(range(rank, n, world_size))
