"""Latent shards: format round trip, encode (codes, flips, resume, DDP), the reader, manifest checks."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import tarfile

import numpy as np
import pytest
import torch

from uvq.checkpoint import load_model, write_checkpoint_dir
from uvq.config import load_config
from uvq.prior.latents import (
    LatentStream,
    check_tokenizer,
    encode_dataset,
    iterate_latents,
    latents_stream,
    list_shards,
    read_manifest,
    read_shard,
    write_latents,
    write_shard,
)
from uvq.runtime import UserError


def _grids(n: int, prefix: str, k: int = 64, shape=(4, 4), seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(f"{prefix}.{i:04d}", rng.integers(0, k, shape).astype(np.uint16)) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The format
# ---------------------------------------------------------------------------------------------


def test_round_trip_codes_keys_and_manifest(tmp_path):
    train, val = _grids(25, "dir/img", seed=1), _grids(7, "v", seed=2)
    write_latents(tmp_path, {"train": train, "val": val}, codebook_size=64, shard_size=10)
    m = read_manifest(tmp_path)
    assert m["codebook_size"] == 64 and m["latent_shape"] == [4, 4] and m["tokenizer"] is None
    assert m["num_samples"] == {"train": 25, "val": 7}
    assert [s["name"] for s in m["shards"]] == ["latents-000000.tar", "latents-000001.tar", "latents-000002.tar",
                                               "val-000000.tar"]
    # the tar members are webdataset's "<key>.codes.npy", each an h x w uint16 .npy
    with tarfile.open(tmp_path / "latents-000000.tar") as tar:
        names = tar.getnames()
        arr = np.load(io.BytesIO(tar.extractfile(names[0]).read()), allow_pickle=False)
    assert names[0] == "dir/img.0000.codes.npy" and arr.dtype == np.uint16 and arr.shape == (4, 4)
    for split, items in (("train", train), ("val", val)):
        got = [(k, c) for b in iterate_latents(m, split, batch_size=4) for k, c in zip(b["key"], b["codes"], strict=True)]
        assert [k for k, _ in got] == [k for k, _ in items]  # keys with dots survive
        assert all(torch.equal(c, torch.from_numpy(e.astype(np.int64))) for (_, c), (_, e) in zip(got, items, strict=True))


def test_external_manifest_without_shard_list(tmp_path):
    """An external tool may write only the required fields; shards are found by name and counted."""
    write_shard(tmp_path / "latents-000000.tar", _grids(5, "a"))
    write_shard(tmp_path / "val-000000.tar", _grids(2, "b"))
    (tmp_path / "latents-000001.tar.tmp").write_bytes(b"half a shard")  # never read
    (tmp_path / "manifest.json").write_text(json.dumps({"codebook_size": 64, "latent_shape": [4, 4], "tokenizer": None}))
    m = read_manifest(tmp_path)
    assert m["num_samples"] == {"train": 5, "val": 2}
    assert [s["name"] for s in m["shards"]] == ["latents-000000.tar", "val-000000.tar"]


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"latent_shape": [4, 4], "tokenizer": None}), "'codebook_size'"),
    (json.dumps({"codebook_size": 64, "latent_shape": [4], "tokenizer": None}), "latent_shape"),
])
def test_corrupt_manifest_is_a_user_error(tmp_path, content, needle):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(UserError, match=needle):
        read_manifest(tmp_path)


def test_missing_manifest_and_missing_shard(tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(tmp_path)
    write_latents(tmp_path, {"train": _grids(4, "a"), "val": _grids(2, "b")}, codebook_size=64)
    (tmp_path / "val-000000.tar").unlink()
    with pytest.raises(UserError, match="val-000000.tar .*missing"):
        read_manifest(tmp_path)


def test_codes_outside_the_codebook_are_refused(tmp_path):
    write_latents(tmp_path, {"train": _grids(4, "a", k=64)}, codebook_size=64)
    m = read_manifest(tmp_path)
    m["codebook_size"] = 8  # as if the manifest lied
    with pytest.raises(UserError, match="outside"):
        next(iterate_latents(m, "train"))


def test_check_tokenizer_names_the_field(tmp_path):
    m = write_latents(tmp_path, {"train": _grids(4, "a")}, codebook_size=64,
                      tokenizer={"sha256": "a" * 64, "path": "vq", "weights": "ema"})
    m["root"] = str(tmp_path)
    check_tokenizer(m, "a" * 64, 64, [4, 4])  # all equal: accepted
    with pytest.raises(UserError, match="tokenizer sha256 differs"):
        check_tokenizer(m, vqgan_sha256="b" * 64)
    with pytest.raises(UserError, match="codebook_size differs.*64.*1024"):
        check_tokenizer(m, codebook_size=1024)
    with pytest.raises(UserError, match=r"latent_shape differs.*\[4, 4\].*\[16, 16\]"):
        check_tokenizer(m, latent_shape=[16, 16])
    m["tokenizer"] = None
    with pytest.raises(UserError, match="tokenizer: null"):
        check_tokenizer(m, vqgan_sha256="a" * 64)


# ---------------------------------------------------------------------------------------------
# The training stream: shuffled, disjoint across ranks, infinite, resumable
# ---------------------------------------------------------------------------------------------


def test_stream_epochs_ranks_and_exact_resume(tmp_path):
    items = [(f"k{i}", np.full((2, 2), i, dtype=np.uint16)) for i in range(60)]
    write_latents(tmp_path, {"train": items}, codebook_size=64, shard_size=7)
    m = read_manifest(tmp_path)
    # Over one epoch the two ranks see disjoint halves that together are every sample once.
    seen = []
    for rank in (0, 1):
        s = LatentStream(m, batch_size=5, seed=3, rank=rank, world_size=2, buffer_shards=2)
        samples = s.samples()
        while (v := next(samples)) is not None and s.epoch == 0:  # the epoch advances on its first sample
            seen.append(int(v[0, 0]))
    assert sorted(seen) == list(range(60))
    # Shuffled, and differently in the next epoch.
    s = LatentStream(m, batch_size=60, seed=3)
    it = iter(s)
    e0, e1 = next(it)[:, 0, 0].tolist(), next(it)[:, 0, 0].tolist()
    assert e0 != list(range(60)) and e0 != e1 and sorted(e0) == sorted(e1)
    # Resume: a new stream with the saved position continues exactly.
    a = LatentStream(m, batch_size=8, seed=5, flatten=True)
    ita = iter(a)
    for _ in range(11):  # crosses an epoch boundary
        next(ita)
    state = a.state_dict()
    expected = [next(ita) for _ in range(5)]
    b = LatentStream(m, batch_size=8, seed=5, flatten=True)
    b.load_state_dict(state)
    itb = iter(b)
    assert all(torch.equal(next(itb), e) for e in expected)
    assert expected[0].shape == (8, 4)


def test_evaluation_pass_is_ordered(tmp_path):
    write_latents(tmp_path, {"train": _grids(9, "t"), "val": _grids(5, "v")}, codebook_size=64, shard_size=4)
    batches = list(latents_stream(tmp_path, split="val", batch_size=2, train=False))
    assert [k for b in batches for k in b["key"]] == [f"v.{i:04d}" for i in range(5)]
    shares = [list(latents_stream(tmp_path, split="train", batch_size=9, rank=r, world_size=2, train=False))
              for r in (0, 1)]
    keys = [k for share in shares for b in share for k in b["key"]]
    assert sorted(keys) == [f"t.{i:04d}" for i in range(9)] and len(shares[0][0]["key"]) == 5


# ---------------------------------------------------------------------------------------------
# Encode: a real (tiny, randomly initialised) VQGAN over the demo images
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vqgan(tmp_path_factory):
    from uvq.vqgan.model import build_vqgan

    cfg = load_config("demo", ["data.demo_images=40", "data.val_fraction=0.2"])
    torch.manual_seed(0)
    vq = build_vqgan(cfg.model.vqgan)
    path = tmp_path_factory.mktemp("vq") / "ckpt"
    write_checkpoint_dir(path, kind="vqgan", model_config=dataclasses.asdict(cfg.model.vqgan),
                         weights={"model": vq}, config=cfg.to_dict())
    model, meta = load_model(path, "vqgan")
    return cfg, model, meta, path


def _encode(tiny, out, **kw):
    cfg, model, meta, _ = tiny
    args = {"batch_size": 8, "shard_size": 6, "flip_copies": True} | kw
    return encode_dataset(model, meta, cfg.data, out, **args)


def test_encode_writes_the_vqgans_codes_and_flips(tmp_path, tiny_vqgan):
    from uvq.data.streams import iterate_images

    cfg, model, meta, path = tiny_vqgan
    m = _encode(tiny_vqgan, tmp_path / "lat")
    m = read_manifest(tmp_path / "lat")
    assert m["tokenizer"]["sha256"] == meta["weights_sha256"] and m["tokenizer"]["path"] == str(path)
    assert m["tokenizer"]["model_config"]["codebook_size"] == 64 and m["latent_shape"] == [8, 8]
    assert m["transform"]["img_size"] == 32 and m["transform"]["flip_copies"] is True
    for split in ("train", "val"):
        images = list(iterate_images(cfg.data, 32, split=split, batch_size=100))[0]
        with torch.inference_mode():
            codes = model.encode_codes(images["image"])
            flips = model.encode_codes(images["image"].flip(-1))
        got = {k: c for b in iterate_latents(m, split, batch_size=100) for k, c in zip(b["key"], b["codes"], strict=True)}
        assert len(got) == 2 * len(images["key"]) == m["num_samples"][split]
        for key, c, f in zip(images["key"], codes, flips, strict=True):
            assert torch.equal(got[key], c) and torch.equal(got[key + ".flip"], f)


def test_encode_resumes_without_redoing_finished_shards(tmp_path, tiny_vqgan):
    out = tmp_path / "lat"
    first = _encode(tiny_vqgan, out)
    shards = list_shards(out)["train"]
    assert len(shards) >= 3
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    # Simulate a kill: one shard never finished (a .tmp remains), the manifest was not written.
    victim = shards[1]
    victim.unlink()
    (out / (victim.name + ".tmp")).write_bytes(b"truncated tar")
    (out / "manifest.json").unlink()
    with pytest.raises(UserError, match="has not finished"):
        read_manifest(out)
    assert victim.name not in {p.name for p in list_shards(out)["train"]}  # the reader ignores .tmp
    second = _encode(tiny_vqgan, out)
    assert second["encoded"] == 6 and second["skipped"] == first["encoded"] - 6  # only the victim's images
    for p in list_shards(out)["train"]:
        mtime, data = before[p.name]
        assert p.read_bytes() == data
        if p.name != victim.name:
            assert p.stat().st_mtime_ns == mtime  # untouched
    assert not list(out.glob("*.tmp"))
    assert [s["sha256"] for s in second["shards"]] == [s["sha256"] for s in first["shards"]]
    # A re-run with other settings would mix two encodes: refused, naming the setting.
    with pytest.raises(UserError, match="shard_size=6.*shard_size=5"):
        _encode(tiny_vqgan, out, shard_size=5)
    third = _encode(tiny_vqgan, out, shard_size=5, overwrite=True)  # --overwrite starts over
    assert third["skipped"] == 0 and all(p.name.endswith(".tar") or p.name in ("manifest.json", "encode.json", ".uvq")
                                         for p in out.iterdir())


def _ddp_worker(rank: int, world: int, port: int, out: str, tiny) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _encode(tiny, out, flip_copies=False, shard_size=4)
    finally:
        dist.destroy_process_group()


def test_ddp_encode_two_ranks_write_disjoint_shards(tmp_path, tiny_vqgan):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg, model, meta, path = tiny_vqgan
    tiny = (cfg, None, meta, path)
    mp.spawn(_ddp_worker_loaded, args=(2, port, str(tmp_path / "ddp"), tiny), nprocs=2, join=True)
    single = _encode(tiny_vqgan, tmp_path / "one", flip_copies=False, shard_size=4)
    ddp = read_manifest(tmp_path / "ddp")
    assert ddp["num_samples"] == single["num_samples"]
    names = [s["name"] for s in ddp["shards"]]
    assert len(names) == len(set(names))
    codes = {}
    for s in ddp["shards"]:
        for k, c in read_shard(tmp_path / "ddp" / s["name"]):
            assert k not in codes  # each image in exactly one shard
            codes[k] = c
    ref = {k: c for s in single["shards"] for k, c in read_shard(tmp_path / "one" / s["name"])}
    assert codes.keys() == ref.keys() and all(np.array_equal(codes[k], ref[k]) for k in ref)


def _ddp_worker_loaded(rank: int, world: int, port: int, out: str, tiny) -> None:
    cfg, _, _, path = tiny
    model, meta = load_model(path, "vqgan")
    _ddp_worker(rank, world, port, out, (cfg, model, meta, path))


def test_long_and_unsafe_keys_are_stored_hashed_with_the_original_kept(tmp_path, tiny_vqgan):
    """A 120-character file name and a 200-character shard key do not fit a tar name; both are
    encoded (no internal error, no .tmp shard) under hashed names, and read back as their keys."""
    import webdataset as wds
    from PIL import Image

    from uvq.config import DataConfig

    cfg, model, meta, _ = tiny_vqgan
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    folder = tmp_path / "imgs"
    folder.mkdir()
    long_file = "f" * 116  # 120 characters with ".png"
    images[0].save(folder / f"{long_file}.png")
    images[1].save(folder / "short.png")
    out = tmp_path / "lat"
    data = DataConfig(source=str(folder), val_fraction=0.0)
    encode_dataset(model, meta, data, out, batch_size=4, shard_size=6)
    manifest = read_manifest(out)
    got = {k for b in iterate_latents(manifest, "train", batch_size=10) for k in b["key"]}
    assert got == {long_file, "short"} and not list(out.glob("*.tmp"))

    shard = tmp_path / "data-000.tar"
    long_key = "k" * 200
    with wds.TarWriter(str(shard)) as sink:
        for key, im in ((long_key, images[0]), ("ok", images[2])):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            sink.write({"__key__": key, "png": buf.getvalue()})
    out2 = tmp_path / "lat2"
    encode_dataset(model, meta, DataConfig(source=str(shard), val_fraction=0.0), out2, batch_size=4, shard_size=6)
    manifest = read_manifest(out2)
    got = {k for b in iterate_latents(manifest, "train", batch_size=10) for k in b["key"]}
    assert got == {long_key, "ok"} and not list(out2.glob("*.tmp"))
    for path in out2.glob("*.tar"):
        with tarfile.open(path) as tar:
            assert all(len(n) <= 100 and ".." not in n for n in tar.getnames())

    # a key that would climb out of the archive is never written as a member name
    written = write_shard(tmp_path / "w.tar", [("../../escape", np.zeros((2, 2), np.uint16))])
    with tarfile.open(written) as tar:
        assert all(not n.startswith(("/", "..")) and "/.." not in n for n in tar.getnames())
    assert [k for k, _ in read_shard(written)] == ["../../escape"]
