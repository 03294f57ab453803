"""Checkpoint integrity, links and pruning, and nothing run (docs/reliability.md, "Integrity").

Real checkpoints of tiny models are written with uvq's own save functions, then damaged with
tests/faults/hostile.py; every damaged copy must be refused with one line naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_uvq
from faults import hostile

from uvq import checkpoint
from uvq.checkpoint import (
    MAX_PARAMETERS,
    file_sha256,
    find_vqgan,
    load_model,
    load_trainer_state,
    read_meta,
    resolve_pair,
    resume_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from uvq.config import PriorConfig, VQGANConfig, load_config
from uvq.prior.latents import check_recorded_source, encode_dataset, tokenizer_record
from uvq.prior.model import AbsorbingTransformer
from uvq.runtime import UserError
from uvq.vqgan.model import build_vqgan

K = 16
VC = VQGANConfig(img_size=16, nf=32, ch_mult=[1, 2], res_blocks=1, attn_resolutions=[], emb_dim=8, codebook_size=K)
PC = PriorConfig(n_embd=32, n_head=2, n_layer=1, codebook_size=K, latent_shape=[8, 8])


def _vqgan(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_vqgan(VC)


def _prior(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AbsorbingTransformer(codebook_size=K, n_tokens=PC.n_tokens, n_embd=32, n_head=2, n_layer=1)


def _save_vqgan(run: Path, step: int, seed: int = 0, **kw) -> Path:
    cfg = load_config("demo", ["data.demo_images=16", "data.val_fraction=0.25"]).to_dict()
    return save_checkpoint(run, step, kind="vqgan", model_config=dataclasses.asdict(VC), config=cfg,
                           weights={"model": _vqgan(seed), "ema": _vqgan(seed + 100)},
                           trainer_state={"step": step, "x": torch.ones(2)}, **kw)


def _save_prior(run: Path, step: int, vq_ckpt: Path, seed: int = 0, **kw) -> Path:
    vq_meta = read_meta(vq_ckpt)
    vq_meta["weights_sha256"] = vq_meta["weights_sha256"]["ema"]
    tok = tokenizer_record(vq_meta, "ema")
    return save_checkpoint(run, step, kind="prior", model_config=dataclasses.asdict(PC), weights={"model": _prior(seed)},
                           provenance={"tokenizer": tok, "vqgan": tok["path"]},
                           trainer_state={"step": step, "best": {"step": step}}, **kw)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A VQGAN run (steps 1, 2) and a prior run trained on the step-2 VQGAN's codes."""
    root = tmp_path_factory.mktemp("good")
    vq1 = _save_vqgan(root / "vqgan", 1)
    vq2 = _save_vqgan(root / "vqgan", 2, seed=1)
    prior = _save_prior(root / "prior", 5, vq2)
    return {"root": root, "vq1": vq1, "vq2": vq2, "prior": prior}


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_good_checkpoints_load_and_verify(good):
    model, meta = load_model(good["vq2"], "vqgan")
    assert meta["weights_sha256"] == file_sha256(good["vq2"] / "ema.safetensors")
    net, pmeta = load_model(good["prior"], "prior")
    assert verify_checkpoint(good["vq2"], "vqgan")["trainer_sha256"] == file_sha256(good["vq2"] / "trainer.pt")
    assert load_trainer_state(good["vq2"])["step"] == 2
    assert sum(p.numel() for p in model.parameters()) < MAX_PARAMETERS


# ---------------------------------------------------------------------------------------------
# Finding 5: damaged or hostile checkpoints are refused, naming the file
# ---------------------------------------------------------------------------------------------

WEIGHT_FAULTS = [
    ("flipped_bytes", {"file": "ema.safetensors"}, "ema.safetensors does not match the sha256"),
    ("wrong_shape", {"file": "ema.safetensors"}, "architecture has float32"),
    ("nan_weights", {"file": "ema.safetensors"}, "NaN or infinite"),
    ("int64_weights", {"file": "ema.safetensors"}, "as int64"),
]


@pytest.mark.parametrize(("fault", "kw", "message"), WEIGHT_FAULTS, ids=[f[0] for f in WEIGHT_FAULTS])
def test_damaged_weights_are_refused(good, tmp_path, fault, kw, message):
    bad = getattr(hostile, fault)(good["vq2"], out=tmp_path / "bad", **kw)
    with pytest.raises(UserError) as exc:
        load_model(bad, "vqgan")
    assert message in _one_line(exc) and str(bad) in str(exc.value)
    with pytest.raises(UserError, match="damaged or was altered"):
        verify_checkpoint(bad)  # a resume checks every weight file
    load_model(bad, "vqgan", weights="model")  # the other file is intact and still loads


def test_inf_and_prior_faults(good, tmp_path):
    bad = hostile.nan_weights(good["prior"], value=float("inf"), out=tmp_path / "inf")
    with pytest.raises(UserError, match="NaN or infinite"):
        load_model(bad, "prior")
    bad = hostile.flipped_bytes(good["prior"], file="model.safetensors", out=tmp_path / "flip")
    with pytest.raises(UserError, match="sha256"):
        load_model(bad, "prior")


@pytest.mark.parametrize("which", ["vq2", "prior"])
def test_absurd_architecture_is_refused_before_it_is_built(good, tmp_path, which):
    bad = hostile.absurd_architecture(good[which], out=tmp_path / "absurd")
    kind = read_meta(bad)["kind"]
    with pytest.raises(UserError) as exc:
        load_model(bad, kind)
    assert "implausibly large" in _one_line(exc) and f"> {MAX_PARAMETERS:,}" in str(exc.value)


def test_huge_img_size_and_non_object_meta(good, tmp_path):
    with pytest.raises(UserError, match="img_size 65536 > 4096"):
        load_model(hostile.huge_img_size(good["vq2"], out=tmp_path / "big"), "vqgan")
    bad = hostile.non_object_meta(good["vq2"], out=tmp_path / "list")
    with pytest.raises(UserError) as exc:
        read_meta(bad)
    assert "holds a JSON list, not an object" in _one_line(exc)
    bad = hostile.edited_meta(good["vq2"], "nosha", lambda m: {k: v for k, v in m.items() if k != "weights_sha256"}, out=tmp_path / "nosha")
    with pytest.raises(UserError, match="no weights_sha256"):
        load_model(bad, "vqgan")


def test_swapped_trainer_state_is_refused(good, tmp_path):
    for donor in (good["vq1"], good["prior"]):  # another step of the run, another kind
        bad = hostile.swapped_trainer(good["vq2"], donor, out=tmp_path / donor.parent.parent.name / donor.name)
        with pytest.raises(UserError) as exc:
            load_trainer_state(bad)
        assert "trainer.pt does not match the sha256" in _one_line(exc)
    # A checkpoint from before trainer_sha256 was recorded still has its step checked.
    bad = hostile.swapped_trainer(good["vq2"], good["vq1"], out=tmp_path / "old")
    hostile.edited_meta(bad, "x", lambda m: {k: v for k, v in m.items() if k != "trainer_sha256"}, out=tmp_path / "old-nosha")
    with pytest.raises(UserError, match="its step is 1, meta.json says 2"):
        load_trainer_state(tmp_path / "old-nosha")


def test_sha_is_computed_once_per_file_version(good, tmp_path):
    bad = hostile.copy_of(good["vq1"], "cache", tmp_path / "c")
    f = bad / "model.safetensors"
    first = file_sha256(f)
    keys = [k for k in checkpoint._SHA_CACHE if k[0] == str(f.resolve())]
    assert len(keys) == 1 and file_sha256(f) == first
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same bytes, touched: hashed again
    assert file_sha256(f) == first
    assert len([k for k in checkpoint._SHA_CACHE if k[0] == str(f.resolve())]) == 2


def test_samples_never_record_a_wrong_hash(good, tmp_path):
    from uvq.sampling.outputs import write_samples

    root = hostile.copy_of(good["root"], "flipped", tmp_path / "run")
    hostile.flipped_bytes(root / "vqgan" / "checkpoints" / "step-00000002", out=tmp_path / "damaged")
    vq = root / "vqgan" / "checkpoints" / "step-00000002"
    (vq / "ema.safetensors").write_bytes((tmp_path / "damaged" / "ema.safetensors").read_bytes())
    prior = root / "prior" / "checkpoints" / "step-00000005"
    with pytest.raises(UserError, match="ema.safetensors does not match the sha256"):
        write_samples(prior, tmp_path / "s", vqgan=vq, n=2, steps=2, batch_size=2, device="cpu")


def test_an_import_stopped_before_verification_is_not_taken_for_finished(tmp_path):
    from uvq.interop.convert import _write

    ckpt = _write(tmp_path / "imported", "vqgan", dataclasses.asdict(VC), _vqgan(0).state_dict(), {"source": "import"})
    with pytest.raises(UserError) as exc:
        load_model(ckpt, "vqgan")
    assert "stopped before its verification finished" in _one_line(exc)
    load_model(ckpt, "vqgan", allow_unverified=True)  # what the verification itself does
    checkpoint.mark_verified(ckpt)
    load_model(ckpt, "vqgan")


def test_foreign_files_with_nan_or_a_huge_unpacked_size_are_refused(tmp_path):
    import zipfile

    from uvq.interop import layouts

    bad = {"w": torch.tensor([1.0, float("nan")])}
    torch.save(bad, tmp_path / "nan.th")
    with pytest.raises(UserError, match="NaN or infinite values in"):
        layouts._tensors_only(layouts.load_tensor_file(tmp_path / "nan.th", "--vqgan"), tmp_path / "nan.th", "--vqgan")
    # A zip whose central directory claims 4 x 4.3 GB (a decompression bomb) is refused before torch.load.
    with zipfile.ZipFile(tmp_path / "bomb.th", "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(4):
            zf.writestr(f"archive/data/{i}", b"\0" * 1000)
    data = bytearray((tmp_path / "bomb.th").read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        data[at + 24:at + 28] = (0xFFFFFFF0).to_bytes(4, "little")  # the entry's uncompressed size
        at = data.find(b"PK\x01\x02", at + 4)
    (tmp_path / "bomb.th").write_bytes(bytes(data))
    with pytest.raises(UserError, match="would unpack to 17 GB"):
        layouts.load_tensor_file(tmp_path / "bomb.th", "--vqgan")


# ---------------------------------------------------------------------------------------------
# Finding 1: nothing read from a checkpoint is run
# ---------------------------------------------------------------------------------------------


def test_recorded_sources_that_would_run_a_program_are_refused():
    for source in ("demo", "data/images", "shards/train-{000..009}.tar", "https://example.org/a-{0..1}.tar"):
        assert check_recorded_source(source, "x") == source
    for source in ("pipe:touch PWNED; cat good.tar", "{pipe:touch PWNED,a}.tar", "gs://bucket/a.tar", "ais://x"):
        with pytest.raises(UserError, match="never runs a command read from a file"):
            check_recorded_source(source, "x")


def test_encode_does_not_run_a_pipe_source_from_a_checkpoint(good, tmp_path):
    bad = hostile.pipe_source(good["vq2"], out=tmp_path / "pipe")
    proc = run_uvq("encode", "--vqgan", str(bad), "--out", str(tmp_path / "L"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "L").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "would run a program" in lines[0] and "--data" in lines[0]


# ---------------------------------------------------------------------------------------------
# Finding 6: links and pruning that lose nothing
# ---------------------------------------------------------------------------------------------


def test_dangling_last_is_refused_not_restarted(tmp_path):
    """A real fit-vqgan run: with `last` dangling, --resume refuses and every checkpoint stays."""
    tiny = ["model.vqgan.img_size=16", "model.vqgan.ch_mult=[1,2]", "model.vqgan.attn_resolutions=[]",
            "model.vqgan.emb_dim=8", "model.vqgan.codebook_size=16", "model.discriminator.ndf=8",
            "model.discriminator.n_layers=1", "model.prior.codebook_size=16", "model.prior.latent_shape=[8,8]",
            "data.demo_images=16", "train.batch_size=2", "run.ckpt_every=1", "run.keep_last=2", "run.image_every=100"]
    run = tmp_path / "run"
    proc = run_uvq("fit-vqgan", "demo", "--out", str(run), "--device", "cpu", "train.steps=3", *tiny)
    assert proc.returncode == 0, proc.stderr
    bad = hostile.dangling_last(run, out=tmp_path / "bad")
    before = sorted(p.name for p in (bad / "checkpoints").iterdir())
    proc = run_uvq("fit-vqgan", "demo", "--out", str(bad), "--device", "cpu", "--resume", "train.steps=5", *tiny)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "points at step-00000003, which is not a complete checkpoint" in line and "ln -sfn step-00000002" in line
    assert sorted(p.name for p in (bad / "checkpoints").iterdir()) == before


def test_missing_last_and_stale_best_are_repaired_and_leftovers_removed(good, tmp_path):
    run = hostile.copy_of(good["root"] / "prior", "r", tmp_path / "prior")
    _save_prior(run, 6, good["vq2"], extra_meta={"best": {"step": 5}})
    _save_prior(run, 7, good["vq2"], extra_meta={"best": {"step": 7}})  # better; killed before mark_best
    hostile.stale_best(run, "step-00000005", out=tmp_path / "stale")
    root = tmp_path / "stale" / "checkpoints"
    (root / "last").unlink()  # killed between a checkpoint's rename and the link
    (root / ".step-00000008.abc.tmp").mkdir()  # a killed checkpoint write
    assert resume_checkpoint(root.parent, "prior").name == "step-00000007"
    assert os.readlink(root / "last") == "step-00000007" and os.readlink(root / "best") == "step-00000007"
    assert not (root / ".step-00000008.abc.tmp").exists()


def test_last_of_another_kind_or_outside_the_run_is_refused(good, tmp_path):
    bad = hostile.last_to(good["root"] / "vqgan", good["prior"], out=tmp_path / "kind")
    with pytest.raises(UserError) as exc:
        resume_checkpoint(bad, "vqgan")
    assert "points at a prior checkpoint, but" in _one_line(exc)
    bad = hostile.copy_of(good["root"] / "vqgan", "abs", tmp_path / "abs")
    (bad / "checkpoints" / "last").unlink()
    os.symlink(good["prior"], bad / "checkpoints" / "last")
    with pytest.raises(UserError, match="not a complete checkpoint of this run"):
        resume_checkpoint(bad, "vqgan")


def test_pruning_keeps_best_and_the_tokenizer_of_downstream_latents(tmp_path):
    run = tmp_path / "vqgan"
    used = _save_vqgan(run, 1)
    model, meta = load_model(used, "vqgan")
    cfg = load_config("demo", ["data.demo_images=16", "data.val_fraction=0.25"])
    encode_dataset(model, meta, cfg.data, tmp_path / "latents", batch_size=8, shard_size=8)
    assert any((used / checkpoint.USED_BY).iterdir())
    best = _save_vqgan(run, 2)
    checkpoint.mark_best(run, best)
    for step in (3, 4, 5):
        _save_vqgan(run, step, keep_last=1)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best", "last", "step-00000001", "step-00000002", "step-00000005"]
    # A rewritten step keeps its records.
    _save_vqgan(run, 1, keep_last=10)
    assert any((used / checkpoint.USED_BY).iterdir())


def test_a_vqgan_that_is_not_the_priors_tokenizer_needs_an_explicit_flag(good):
    prior_meta = read_meta(good["prior"])
    ckpt, weights, _ = find_vqgan(prior_meta, good["vq2"])
    assert ckpt == good["vq2"] and weights == "ema"
    with pytest.raises(UserError) as exc:
        resolve_pair(prior_meta, good["vq1"])
    assert "has other weights" in _one_line(exc) and "sample.allow_other_vqgan=true" in str(exc.value)
    events = []
    meta, _ = resolve_pair(prior_meta, good["vq1"], allow_other_vqgan=True, progress=events.append)
    assert meta["path"] == str(good["vq1"]) and events[0]["event"] == "warn"
    json.dumps(events)


def test_the_sample_command_decodes_with_another_vqgan_only_when_the_recipe_allows_it(good, tmp_path):
    args = ["sample", "--prior", str(good["prior"]), "--vqgan", str(good["vq1"]), "-n", "1", "--steps", "2",
            "--device", "cpu"]
    refused = run_uvq(*args, "--out", str(tmp_path / "refused"), cwd=tmp_path)
    assert refused.returncode == 2 and "has other weights" in refused.stderr, refused.stderr
    assert not (tmp_path / "refused").exists()
    allowed = run_uvq(*args, "--out", str(tmp_path / "allowed"), "sample.allow_other_vqgan=true", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "allowed" / "sample-000000.png").is_file()
