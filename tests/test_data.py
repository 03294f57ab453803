"""Data streams: sources, transforms, split, bad images, ranks x workers, exact resume."""

from __future__ import annotations

import hashlib
import io
import math
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T

from uvq.config import DataConfig
from uvq.data.demo import demo_array, demo_image, demo_key, write_demo_folder
from uvq.data.sources import (
    BadImage,
    DemoSource,
    decode_image,
    in_split,
    key_fraction,
    resolve_stream,
)
from uvq.data.streams import count_images, iterate_images, shard_assignment, train_batches
from uvq.images import load_rgb
from uvq.registry import registry
from uvq.runtime import UserError

# ---------------------------------------------------------------------------------------------
# helpers: real files on disk
# ---------------------------------------------------------------------------------------------


def _rand_rgb(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _write_shards(folder: Path, n_shards: int, per_shard: int, size: int = 12) -> list[str]:
    """Real webdataset shards data-000.tar ...; sample key 's{shard}-{j}', a PNG and a class label."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"data-{s:03d}.tar")) as sink:
            for j in range(per_shard):
                key = f"s{s}-{j:03d}"
                sink.write({"__key__": key, "png": _png_bytes(_rand_rgb(size, size, 100 * s + j)), "cls": str(j)})
                keys.append(key)
    return keys


def _all_keys(cfg: DataConfig, img_size: int, split: str = "all", **kw) -> list[str]:
    return [k for b in iterate_images(cfg, img_size, split=split, batch_size=5, **kw) for k in b["key"]]


# ---------------------------------------------------------------------------------------------
# the demo dataset
# ---------------------------------------------------------------------------------------------


def test_demo_images_are_deterministic_varied_and_in_range(tmp_path):
    a, b = demo_image(7, 32), demo_image(7, 32)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and 0.0 <= a.min() and a.max() <= 1.0
    assert demo_image(0, 48).shape == (3, 48, 48)
    imgs = torch.stack([demo_image(i, 32) for i in range(16)])
    assert len({hashlib.sha256(x.numpy().tobytes()).hexdigest() for x in imgs}) == 16
    assert imgs.std() > 0.15  # bold colours, not a flat field
    paths = write_demo_folder(tmp_path / "demo", 3, 32)
    assert [p.name for p in paths] == [f"{demo_key(i)}.png" for i in range(3)]
    assert torch.equal(load_rgb(paths[2]), demo_image(2, 32))  # PNG is lossless


def test_demo_source_gives_the_drawn_pixels():
    cfg = DataConfig(source="demo", demo_images=12, val_fraction=0.0)
    batch = next(iterate_images(cfg, 32, split="all", batch_size=12))
    assert batch["key"] == [demo_key(i) for i in range(12)]
    expected = torch.stack([torch.from_numpy(demo_array(i, 32)).permute(2, 0, 1) for i in range(12)]).float() / 255
    assert torch.equal(batch["image"], expected)


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(50, 37), (37, 50), (32, 32), (100, 64), (17, 90), (31, 33)])
def test_resize_and_crop_match_torchvision(hw):
    im = _rand_rgb(*hw, seed=sum(hw))
    ours = decode_image(_png_bytes(im), 16)
    reference = T.Compose([T.Resize(16), T.CenterCrop(16), T.PILToTensor()])(im)  # the official pipeline
    assert ours.shape == (3, 16, 16) and ours.dtype == torch.uint8
    assert torch.equal(ours, reference)


def test_mode_conversions_to_rgb(tmp_path):
    root = tmp_path / "modes"
    root.mkdir()
    Image.new("L", (20, 20), 77).save(root / "gray.png")
    rgba = Image.new("RGBA", (20, 20), (10, 20, 30, 0))
    rgba.save(root / "rgba.png")  # fully transparent: composited on white
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.save(root / "palette.png")
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(root / "white16.png")
    Image.fromarray(np.full((20, 20), 13107, dtype=np.uint16)).save(root / "dark16.png")  # 0.2 of full scale
    Image.new("CMYK", (20, 20), (0, 0, 0, 0)).save(root / "cmyk.jpg")
    assert Image.open(root / "white16.png").mode.startswith("I")
    cfg = DataConfig(source=str(root), val_fraction=0.0)
    batch = next(iterate_images(cfg, 8, split="all", batch_size=10))
    images = dict(zip(batch["key"], batch["image"], strict=True))
    assert batch["image"].shape == (6, 3, 8, 8)
    assert torch.allclose(images["gray"], torch.full((3, 8, 8), 77 / 255))
    assert torch.equal(images["rgba"], torch.ones(3, 8, 8))
    assert torch.equal(images["palette"], torch.tensor([200, 100, 50]).view(3, 1, 1).expand(3, 8, 8) / 255)
    assert torch.equal(images["white16"], torch.ones(3, 8, 8))
    assert torch.allclose(images["dark16"], torch.full((3, 8, 8), 0.2), atol=1 / 255)
    assert images["cmyk"].min() > 0.95  # CMYK zero ink is white


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------


def test_registry_has_the_three_streams():
    assert {"folder.v1", "webdataset.v1", "demo.v1"} <= set(registry.names("streams"))


def test_folder_source_is_recursive_with_relative_keys(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    _rand_rgb(20, 30, 1).save(root / "b.png")
    _rand_rgb(30, 20, 2).save(root / "sub" / "a.jpg", quality=95)
    _rand_rgb(24, 24, 3).save(root / "sub" / "deeper" / "c.webp")
    _rand_rgb(24, 24, 4).save(root / "sub" / "d.bmp")
    _rand_rgb(24, 24, 5).save(root / ".hidden" / "e.png")
    (root / "notes.txt").write_text("not an image")
    cfg = DataConfig(source=str(root), val_fraction=0.0)
    assert resolve_stream(cfg) == "folder.v1"
    assert _all_keys(cfg, 16) == ["b", "sub/a", "sub/d", "sub/deeper/c"]
    assert count_images(cfg) == 4
    jpeg = next(iterate_images(DataConfig(source=str(root / "sub"), val_fraction=0.0), 16, split="all", batch_size=1))
    assert jpeg["key"] == ["a"]
    assert torch.equal(jpeg["image"][0], decode_image(root / "sub" / "a.jpg", 16).float() / 255)


def test_folder_key_clash_and_empty_folder_are_user_errors(tmp_path):
    (tmp_path / "clash").mkdir()
    _rand_rgb(8, 8, 0).save(tmp_path / "clash" / "x.png")
    _rand_rgb(8, 8, 0).save(tmp_path / "clash" / "x.jpg")
    with pytest.raises(UserError, match="same key 'x'"):
        count_images(DataConfig(source=str(tmp_path / "clash")))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    with pytest.raises(UserError, match="holds no images"):
        count_images(DataConfig(source=str(tmp_path / "empty")))


def test_folder_of_shards_is_a_webdataset_source(tmp_path):
    """A folder holding only .tar files reads as its shards, in every stage alike."""
    keys = _write_shards(tmp_path / "tars", 2, 3)
    cfg = DataConfig(source=str(tmp_path / "tars"), val_fraction=0.0)
    assert resolve_stream(cfg) == "webdataset.v1" and count_images(cfg) is None
    assert _all_keys(cfg, 8) == keys


def test_webdataset_source_reads_shards_and_brace_patterns(tmp_path):
    keys = _write_shards(tmp_path / "wds", 3, 4)
    pattern = str(tmp_path / "wds" / "data-{000..002}.tar")
    cfg = DataConfig(source=pattern, val_fraction=0.0)
    assert resolve_stream(cfg) == "webdataset.v1"
    assert _all_keys(cfg, 8) == keys  # shard order, then order within a shard
    one = DataConfig(source=str(tmp_path / "wds" / "data-001.tar"), val_fraction=0.0)
    batch = next(iterate_images(one, 8, split="all", batch_size=2))
    assert batch["key"] == ["s1-000", "s1-001"]
    assert torch.equal(batch["image"][1], decode_image(_png_bytes(_rand_rgb(12, 12, 101)), 8).float() / 255)
    assert count_images(cfg) is None


def test_auto_stream_choice_and_missing_source(tmp_path):
    assert resolve_stream(DataConfig(source="demo")) == "demo.v1"
    assert resolve_stream(DataConfig(source="https://example.org/shard-{0..9}.tar")) == "webdataset.v1"
    assert resolve_stream(DataConfig(source="pipe:cat x.tar")) == "webdataset.v1"
    assert resolve_stream(DataConfig(source="demo", stream="folder.v1")) == "folder.v1"
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=f"data.source {missing} does not exist"):
        count_images(DataConfig(source=str(missing)))
    with pytest.raises(UserError, match=r"shard .*missing-1\.tar \(from data.source .*\) does not exist"):
        iterate_images(DataConfig(source=str(tmp_path / "missing-{1..2}.tar")), 8, split="all", batch_size=2)
    with pytest.raises(UserError, match="unknown streams name"):
        count_images(DataConfig(source="demo", stream="nope.v1"))


# ---------------------------------------------------------------------------------------------
# bad images
# ---------------------------------------------------------------------------------------------


def _folder_with_bad_images(root: Path) -> None:
    root.mkdir()
    for i in range(4):
        _rand_rgb(16, 16, i).save(root / f"good{i}.png")
    (root / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    full = _png_bytes(_rand_rgb(64, 64, 9), "JPEG")
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])


def test_corrupt_images_are_skipped_counted_and_warned(tmp_path):
    _folder_with_bad_images(tmp_path / "bad")
    cfg = DataConfig(source=str(tmp_path / "bad"), val_fraction=0.0)
    events = []
    run = iterate_images(cfg, 8, split="all", batch_size=3, progress=events.append)
    batches = list(run)
    assert [b["key"] for b in batches] == [["good0", "good1", "good2"], ["good3"]]
    assert run.stats.seen == 6 and run.stats.skipped == 2
    assert any("garbage.jpg" in e for e in run.stats.examples) and any("truncated.jpg" in e for e in run.stats.examples)
    warns = [e["message"] for e in events if e["event"] == "warn"]
    assert len(warns) == 2 and all("skipped unreadable image" in w for w in warns)

    stream = train_batches(cfg, 8, 4, seed=0, split="all", progress=events.append)
    for _ in range(3):
        batch = next(stream)
        assert len(batch["key"]) == 4 and not any(k.startswith(("garbage", "truncated")) for k in batch["key"])
    assert stream.stats.skipped >= 2 and stream.stats.seen == 12 + stream.stats.skipped


def test_strict_fails_on_the_first_bad_image_naming_it(tmp_path):
    _folder_with_bad_images(tmp_path / "bad")
    cfg = DataConfig(source=str(tmp_path / "bad"), val_fraction=0.0, strict=True)
    with pytest.raises(UserError, match=r"unreadable image .*garbage\.jpg"):
        list(iterate_images(cfg, 8, split="all", batch_size=3))
    with pytest.raises(UserError, match=r"unreadable image .*(garbage|truncated)\.jpg"):
        stream = train_batches(cfg, 8, 2, seed=0, split="all")
        for _ in range(4):
            next(stream)


def test_all_bad_images_is_a_user_error(tmp_path):
    root = tmp_path / "allbad"
    root.mkdir()
    for i in range(3):
        (root / f"x{i}.png").write_bytes(b"nope")
    with pytest.raises(UserError, match="no readable images"):
        next(train_batches(DataConfig(source=str(root), val_fraction=0.0), 8, 2, seed=0))


def test_decompression_bomb_is_a_bad_image(tmp_path, monkeypatch):
    root = tmp_path / "bomb"
    root.mkdir()
    _rand_rgb(10, 10, 0).save(root / "small.png")
    _rand_rgb(40, 40, 1).save(root / "huge.png")  # 1600 pixels, "absurd" under the limit below
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own limit, lowered for the test
    run = iterate_images(DataConfig(source=str(root), val_fraction=0.0), 8, split="all", batch_size=4)
    assert [k for b in run for k in b["key"]] == ["small"]
    assert run.stats.skipped == 1 and "decompression-bomb" in run.stats.examples[0]
    _rand_rgb(30, 40, 2).save(root / "between.png")  # 1x..2x the limit: Pillow only warns; we refuse
    run = iterate_images(DataConfig(source=str(root), val_fraction=0.0), 8, split="all", batch_size=4)
    assert [k for b in run for k in b["key"]] == ["small"] and run.stats.skipped == 2


@pytest.mark.parametrize("cut", ["at_header", "in_header", "in_data"])
def test_truncated_shard_uses_readable_samples_and_reports(tmp_path, cut):
    keys = _write_shards(tmp_path / "wds", 2, 6, size=24)
    shard = tmp_path / "wds" / "data-001.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[6]  # a member of the 4th sample
    at = {"at_header": member.offset, "in_header": member.offset + 100, "in_data": member.offset_data + 1}[cut]
    shard.write_bytes(shard.read_bytes()[:at])
    cfg = DataConfig(source=str(tmp_path / "wds" / "data-{000..001}.tar"), val_fraction=0.0)
    events = []
    run = iterate_images(cfg, 8, split="all", batch_size=4, progress=events.append)
    got = [k for b in run for k in b["key"]]
    assert got[:6] == keys[:6] and 0 < len(got) - 6 < 6
    assert got[6:] == keys[6:len(got)]  # the samples before the damage
    assert run.stats.bad_shards == [str(shard)]
    assert any(e["event"] == "warn" and "data-001.tar" in e["message"] for e in events)
    with pytest.raises(UserError, match=r"shard .*data-001\.tar is truncated"):
        list(iterate_images(DataConfig(source=cfg.source, val_fraction=0.0, strict=True), 8, split="all", batch_size=4))
    stream = train_batches(cfg, 8, 4, seed=1, split="all")
    for _ in range(8):  # several epochs through the damaged shard: reported once
        next(stream)
    assert stream.stats.bad_shards == [str(shard)]


# ---------------------------------------------------------------------------------------------
# the validation split
# ---------------------------------------------------------------------------------------------


def test_key_fraction_is_sha256_of_the_key():
    digest = hashlib.sha256(b"demo-000042").hexdigest()
    assert key_fraction("demo-000042") == int(digest[:16], 16) / 2**64


def test_split_is_deterministic_disjoint_and_sized(tmp_path):
    cfg = DataConfig(source="demo", demo_images=120, val_fraction=0.2)
    train, val, every = (_all_keys(cfg, 4, split=s) for s in ("train", "val", "all"))
    assert sorted(train + val) == every and not set(train) & set(val)
    assert _all_keys(cfg, 4, split="val") == val
    assert count_images(cfg, split="val") == len(val) and count_images(cfg, split="train") == len(train)
    n_val = count_images(DataConfig(source="demo", demo_images=2000, val_fraction=0.2), split="val")
    assert abs(n_val - 400) < 4 * math.sqrt(2000 * 0.2 * 0.8)  # binomial(2000, 0.2) within 4 sigma
    assert val == [k for k in every if in_split(k, "val", 0.2)]
    # The same keys in another source split the same way.
    write_demo_folder(tmp_path / "folder", 40, 4)
    folder_val = _all_keys(DataConfig(source=str(tmp_path / "folder"), val_fraction=0.2), 4, split="val")
    assert folder_val == [k for k in val if int(k[5:]) < 40]
    with pytest.raises(UserError, match="unknown data split"):
        iterate_images(cfg, 4, split="test", batch_size=2)


# ---------------------------------------------------------------------------------------------
# ranks x workers: no duplicates, no omissions
# ---------------------------------------------------------------------------------------------


def test_shard_assignment_partitions_every_sample():
    for n_shards in range(1, 7):
        for slots in range(1, 6):
            owners: dict[tuple[int, int], int] = {}
            for slot in range(slots):
                shards, modulo = shard_assignment(n_shards, slots, slot)
                running = 0
                for s in shards:
                    for j in range(5):  # 5 samples per shard
                        running += 1
                        if modulo is None or (running - 1) % slots == modulo:
                            assert (s, j) not in owners
                            owners[(s, j)] = slot
            assert len(owners) == 5 * n_shards


@pytest.mark.parametrize("world,workers", [(1, 2), (3, 0), (2, 2)])
def test_demo_pass_is_partitioned_across_ranks_and_workers(world, workers):
    cfg = DataConfig(source="demo", demo_images=37, val_fraction=0.1, num_workers=workers)
    per_rank = [_all_keys(cfg, 8, split="train", rank=r, world_size=world) for r in range(world)]
    flat = [k for keys in per_rank for k in keys]
    single = _all_keys(DataConfig(**{**cfg.__dict__, "num_workers": 0}), 8, "train")
    assert len(flat) == len(set(flat)) and sorted(flat) == single
    for r, keys in enumerate(per_rank):
        assert keys == sorted(keys) and len(keys) == count_images(cfg, split="train", rank=r, world_size=world)


@pytest.mark.parametrize("n_shards", [3, 5])
def test_shard_pass_is_partitioned_across_ranks_and_workers(tmp_path, n_shards):
    keys = _write_shards(tmp_path / "wds", n_shards, 5, size=8)
    cfg = DataConfig(source=str(tmp_path / "wds" / f"data-{{000..{n_shards - 1:03d}}}.tar"), val_fraction=0.0,
                     num_workers=2)
    flat = [k for r in range(2) for k in _all_keys(cfg, 8, rank=r, world_size=2)]  # 2 ranks x 2 workers
    assert len(flat) == len(set(flat)) and sorted(flat) == sorted(keys)


def test_train_epoch_is_partitioned_across_ranks_and_reshuffled():
    cfg = DataConfig(source="demo", demo_images=24, val_fraction=0.0, hflip=False, num_workers=2)
    streams = [train_batches(cfg, 8, 4, seed=3, rank=r, world_size=2, split="all") for r in range(2)]
    epoch = [[k for _ in range(3) for k in next(s)["key"]] for s in streams]  # 24 = 2 ranks x 3 x 4
    assert sorted(epoch[0] + epoch[1]) == sorted(demo_key(i) for i in range(24))
    second = [[k for _ in range(3) for k in next(s)["key"]] for s in streams]
    assert sorted(second[0] + second[1]) == sorted(demo_key(i) for i in range(24))
    assert epoch[0] + epoch[1] != second[0] + second[1]  # a fresh shuffle from (seed, epoch)
    assert all(s.state_dict()["epoch"] == 2 for s in streams)


# ---------------------------------------------------------------------------------------------
# flips and exact resume
# ---------------------------------------------------------------------------------------------


def test_hflip_mirrors_some_images_and_nothing_else():
    cfg = DataConfig(source="demo", demo_images=32, val_fraction=0.0)
    batch = next(train_batches(cfg, 16, 32, seed=0, split="all"))
    flipped = 0
    for key, image in zip(batch["key"], batch["image"], strict=True):
        original = demo_image(int(key[5:]), 16)
        assert torch.equal(image, original) or torch.equal(image, original.flip(-1))
        flipped += not torch.equal(image, original)
    assert 4 <= flipped <= 28
    plain = next(train_batches(DataConfig(**{**cfg.__dict__, "hflip": False}), 16, 32, seed=0, split="all"))
    assert torch.equal(plain["image"], torch.stack([demo_image(int(k[5:]), 16) for k in plain["key"]]))


def _assert_resumes_exactly(make, k: int, m: int, tmp_path: Path) -> None:
    reference = make()
    expected = [next(reference) for _ in range(k + m)]
    first = make()
    for _ in range(k):
        next(first)
    torch.save(first.state_dict(), tmp_path / "data.pt")
    first.close()
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "data.pt", weights_only=True))
    for want in expected[k:]:
        got = next(resumed)
        assert got["key"] == want["key"]
        assert torch.equal(got["image"], want["image"])
    assert resumed.stats.to_dict() == reference.stats.to_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_train_batches_resume_exactly_on_demo(tmp_path, workers):
    cfg = DataConfig(source="demo", demo_images=20, val_fraction=0.1, num_workers=workers)
    _assert_resumes_exactly(lambda: train_batches(cfg, 8, 3, seed=5), k=4, m=6, tmp_path=tmp_path)  # crosses epochs


def test_train_batches_resume_exactly_on_a_folder_with_bad_images(tmp_path):
    _folder_with_bad_images(tmp_path / "bad")
    cfg = DataConfig(source=str(tmp_path / "bad"), val_fraction=0.0)
    _assert_resumes_exactly(lambda: train_batches(cfg, 8, 3, seed=1, split="all"), k=3, m=4, tmp_path=tmp_path)


def test_train_batches_resume_exactly_on_shards(tmp_path):
    _write_shards(tmp_path / "wds", 3, 5, size=8)
    cfg = DataConfig(source=str(tmp_path / "wds" / "data-{000..002}.tar"), val_fraction=0.2, shuffle_buffer=4)
    _assert_resumes_exactly(lambda: train_batches(cfg, 8, 4, seed=2), k=4, m=5, tmp_path=tmp_path)  # crosses epochs


def test_demo_source_cache_does_not_change_pixels():
    source = DemoSource(8)
    assert torch.equal(source.load(3, 16), source.load(3, 16))
    assert torch.equal(source.load(3, 16), torch.from_numpy(demo_array(3, 16)).permute(2, 0, 1))


# ---------------------------------------------------------------------------------------------
# Bad data: symlink loops, decompression bombs, hostile shards (issue 11, finding 9)
# ---------------------------------------------------------------------------------------------


def test_symlink_loops_are_followed_once_and_reported(tmp_path):
    root = tmp_path / "imgs"
    (root / "a" / "b").mkdir(parents=True)
    for i, sub in enumerate(["", "a", "a/b"]):
        _rand_rgb(8, 8, i).save(root / sub / f"x{i}.png")
    (root / "a" / "b" / "up").symlink_to(root)  # a loop: os.walk(followlinks=True) would read 41x
    (root / "a" / "again").symlink_to(root / "a")  # a second loop: that one hung
    events = []
    cfg = DataConfig(source=str(root), val_fraction=0.0)
    keys = [k for b in iterate_images(cfg, 8, split="all", batch_size=5, progress=events.append) for k in b["key"]]
    assert keys == ["a/b/x2", "a/x1", "x0"]  # each image once, in key order
    warned = [e["message"] for e in events if e["event"] == "warn"]
    assert len(warned) == 2 and all("already read" in m for m in warned)
    assert count_images(cfg) == 3
    # a symlinked folder that is no loop is read (once)
    (tmp_path / "more").mkdir()
    _rand_rgb(8, 8, 9).save(tmp_path / "more" / "y.png")
    (root / "link").symlink_to(tmp_path / "more")
    assert count_images(cfg) == 4


def test_png_claiming_100000_squared_pixels_is_a_bad_image(tmp_path):
    """A PNG whose header claims 100000x100000 pixels is refused from the header, under the bad-image
    policy (skipped with a warning, or an error under strict), before any pixel is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "bomb.png").write_bytes(bomb)
    _rand_rgb(8, 8, 0).save(root / "ok.png")
    with pytest.raises(BadImage, match="DecompressionBomb"):
        decode_image(root / "bomb.png", 8)
    events = []
    cfg = DataConfig(source=str(root), val_fraction=0.0)
    stream = iterate_images(cfg, 8, split="all", batch_size=4, progress=events.append)
    assert [k for b in stream for k in b["key"]] == ["ok"] and stream.stats.skipped == 1
    assert any("bomb.png" in e["message"] and "DecompressionBomb" in e["message"] for e in events if e["event"] == "warn")
    with pytest.raises(UserError, match="bomb.png"):
        list(iterate_images(DataConfig(source=str(root), val_fraction=0.0, strict=True), 8, split="all", batch_size=4))


def test_shard_members_that_leave_the_archive_are_refused(tmp_path):
    """A shard whose member names climb out ('../x') is never extracted; it is bad from that member on."""
    shard = tmp_path / "evil-000.tar"
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "good", "png": _png_bytes(_rand_rgb(8, 8, 1))})
        sink.write({"__key__": "../../escape", "png": _png_bytes(_rand_rgb(8, 8, 2))})
        sink.write({"__key__": "after", "png": _png_bytes(_rand_rgb(8, 8, 3))})
    events = []
    cfg = DataConfig(source=str(shard), val_fraction=0.0)
    stream = iterate_images(cfg, 8, split="all", batch_size=4, progress=events.append)
    assert [k for b in stream for k in b["key"]] == ["good"]
    assert stream.stats.bad_shards == [str(shard)]
    assert any("leaves the archive" in e["message"] for e in events if e["event"] == "warn")
    assert not (tmp_path.parent / "escape.png").exists()
    with pytest.raises(UserError, match="leaves the archive"):
        list(iterate_images(DataConfig(source=str(shard), val_fraction=0.0, strict=True), 8, split="all", batch_size=4))
