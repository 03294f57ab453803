"""Output directories at the command level: --overwrite never deletes a command's own inputs,
a refused command changes nothing, and concurrent writers never lose data (issue 11 findings 3,
4, 8; issue 10 item 2: the dry run refuses what the run refuses)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_uvq

from uvq.checkpoint import load_model, write_checkpoint_dir
from uvq.config import load_config
from uvq.files import MARKER, claim_out_dir
from uvq.prior.latents import encode_dataset, list_shards, read_manifest, read_shard
from uvq.runtime import UserError


def _snapshot(path):
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def vqgans(tmp_path_factory):
    """Two tiny VQGAN checkpoints (different seeds, so different tokenizers) and the demo config."""
    from uvq.vqgan.model import build_vqgan

    cfg = load_config("demo", ["data.demo_images=24", "data.val_fraction=0.25"])
    root = tmp_path_factory.mktemp("vq")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(write_checkpoint_dir(root / f"vq{seed}", kind="vqgan", model_config=dataclasses.asdict(cfg.model.vqgan),
                                          weights={"model": build_vqgan(cfg.model.vqgan)}, config=cfg.to_dict()))
    return cfg, paths


def _encode(cfg, ckpt, out, **kw):
    model, meta = load_model(ckpt, "vqgan")
    return encode_dataset(model, meta, cfg.data, out, batch_size=8, shard_size=6, **kw)


def test_a_refused_encode_changes_nothing(tmp_path, vqgans):
    """Finding 4: re-encoding a finished directory with another VQGAN deleted its manifest first."""
    cfg, (vq0, vq1) = vqgans
    out = tmp_path / "lat"
    _encode(cfg, vq0, out)
    before = _snapshot(out)
    with pytest.raises(UserError, match="tokenizer_sha256"):
        _encode(cfg, vq1, out)
    assert _snapshot(out) == before
    read_manifest(out)  # still a finished encode


def test_overwrite_never_deletes_the_commands_input(tmp_path, vqgans):
    """Finding 3 for encode, fit-vqgan and fit-prior (CLI, real and dry runs)."""
    cfg, (vq0, _) = vqgans
    lat = tmp_path / "lat"
    _encode(cfg, vq0, lat)
    vq_before, lat_before = _snapshot(vq0), _snapshot(lat)
    runs = [
        ("encode", "--vqgan", str(vq0), "--out", str(vq0), "--overwrite"),
        ("fit-prior", "demo", "--latents", str(lat), "--out", str(lat), "--overwrite"),
        ("fit-prior", "demo", "--latents", str(lat), "--out", str(lat), "--overwrite", "--dry-run"),
        ("fit-vqgan", "demo", f"data.source={lat}", "--out", str(lat), "--overwrite"),
        ("fit-vqgan", "demo", f"data.source={lat}", "--out", str(lat), "--overwrite", "--dry-run"),
    ]
    for args in runs:
        proc = run_uvq(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "overlaps this command's own input" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert _snapshot(vq0) == vq_before and _snapshot(lat) == lat_before


def test_sample_into_its_own_prior_is_refused(tmp_path):
    from test_sampling import make_checkpoints

    from uvq.sampling.outputs import write_samples

    _, prior_ckpt = make_checkpoints(tmp_path / "run")
    prior_run = tmp_path / "run" / "prior"
    before = _snapshot(prior_run)
    proc = run_uvq("sample", "--prior", str(prior_run), "--out", str(prior_run), "--overwrite", "-n", "2",
                   "--device", "cpu")
    assert proc.returncode == 2 and "overlaps this command's own input" in proc.stderr, proc.stderr
    with pytest.raises(UserError, match="overlaps"):
        write_samples(prior_ckpt, prior_ckpt, n=2, steps=2, device="cpu", overwrite=True)
    assert _snapshot(prior_run) == before


def test_dry_run_refuses_what_the_run_refuses(tmp_path, vqgans):
    """Issue 10: `fit-prior --dry-run --resume` into a foreign directory passed; the run refused it."""
    cfg, (vq0, _) = vqgans
    lat = tmp_path / "lat"
    _encode(cfg, vq0, lat)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    for cmd in (["fit-prior", "demo", "--latents", str(lat)], ["fit-vqgan", "demo"]):
        for extra in (["--dry-run"], []):
            proc = run_uvq(*cmd, "--out", str(foreign), "--resume", *extra)
            assert proc.returncode == 2 and "not made by uvq" in proc.stderr, (cmd, extra, proc.stderr)
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]


def test_a_held_directory_is_refused(tmp_path, vqgans):
    """Finding 8: a second writer (here: a --resume run while another holds the directory) is refused."""
    _, (vq0, _) = vqgans
    lat = tmp_path / "lat"
    held = claim_out_dir(lat, command="encode")  # another encode is writing here
    try:
        proc = run_uvq("encode", "--vqgan", str(vq0), "--out", str(lat), "data.demo_images=24", "data.val_fraction=0.25")
        assert proc.returncode == 2 and "is in use by `uvq encode`" in proc.stderr, proc.stderr
    finally:
        held.release()


def test_two_concurrent_encodes_lose_no_sample(tmp_path, vqgans):
    """Finding 8: two encodes into one --out lost 104 samples while the manifest called the shards complete."""
    _, (vq0, _) = vqgans
    out = tmp_path / "lat"
    args = [sys.executable, "-m", "uvq", "encode", "--vqgan", str(vq0), "--out", str(out), "data.demo_images=24",
            "data.val_fraction=0.25", "encode.shard_size=6", "--batch-size", "8"]
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code == 0 or (code == 2 and "is in use" in err) for code, err in results), results
    assert any(code == 0 for code, _ in results)
    manifest = read_manifest(out)
    for split in ("train", "val"):
        keys = [k for s in list_shards(out)[split] for k, _ in read_shard(s)]
        assert len(keys) == len(set(keys)) == manifest["num_samples"][split]
    copies = 2 if manifest["transform"]["flip_copies"] else 1
    assert manifest["num_samples"]["train"] + manifest["num_samples"]["val"] == 24 * copies
    assert json.loads((out / MARKER).read_text())["command"] == "encode"
