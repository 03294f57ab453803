"""Hostile and damaged inputs: each one is refused with one line (exit 2) and nothing in it runs.

Promises checked (docs/reliability.md): nothing read from a file is executed or unpickled
(pickle payloads and `pipe:` sources leave their marker file unmade); damaged weights, headers,
metadata, shards and recipes are refused with exit 2 and one `error:` line before anything is
written; image-folder and tar tricks (symlink loops, `../` members, decompression bombs) neither
hang, nor multiply the data, nor write outside the output; `--overwrite` removes only what uvq
wrote.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest

from uvq.files import sha256_file

from . import damage
from .harness import CODEBOOK, REPO, SAMPLE, TINY, assert_one_line_refusal, uvq, uvq_in_process

CPU = ["--device", "cpu"]
FULL = pytest.mark.faults_full
# Damaged copies of a good checkpoint (tests/faults/hostile.py): name -> (the command that reads it).
CHECKPOINT_FAULTS = ("flipped_bytes", "wrong_shape", "nan_weights", "int64_weights", "absurd_architecture",
                     "non_object_meta", "huge_img_size")


def _hostile():
    from . import (
        hostile,  # the damaged-checkpoint helpers (imported here so other cases run without it)
    )
    return hostile


def _ckpt(run):
    return (run / "checkpoints" / "last").resolve()


def _refused_and_unwritten(code, err, *outs):
    assert_one_line_refusal(code, err)
    for out in outs:
        assert not out.exists(), f"a refused command wrote {out}"


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints, read by the command that uses each kind
# ---------------------------------------------------------------------------------------------


@pytest.mark.fault("checkpoint")
@pytest.mark.parametrize("kind", ["prior", "vqgan"])
@pytest.mark.parametrize("fault", [pytest.param(f, marks=[] if f == "flipped_bytes" else [FULL])
                                   for f in CHECKPOINT_FAULTS])
def test_damaged_checkpoint_is_refused(fault, kind, copy_of_trained, tmp_path):
    if fault == "huge_img_size" and kind == "prior":
        pytest.skip("img_size is a VQGAN setting")
    run = copy_of_trained(kind)
    bad = getattr(_hostile(), fault)(_ckpt(run), out=tmp_path / f"{fault}-ckpt")
    out = tmp_path / "out"
    if kind == "prior":
        code, err = uvq_in_process("sample", "--prior", str(bad), "--out", str(out), *SAMPLE, *CPU, cwd=tmp_path)
    else:
        code, err = uvq_in_process("encode", "--vqgan", str(bad), "--out", str(out), "--recipe", "demo", *TINY,
                                   *CPU, cwd=tmp_path)
    _refused_and_unwritten(code, err, out)


@pytest.mark.fault("checkpoint")
@pytest.mark.faults_full
@pytest.mark.parametrize("how", ["huge", "garbage", "offsets"])
@pytest.mark.parametrize("file", ["model.safetensors", "ema.safetensors"])
def test_malformed_safetensors_header_is_refused(how, file, copy_of_trained, tmp_path):
    run = copy_of_trained("prior")
    damage.malformed_safetensors(_ckpt(run) / file, how)
    out = tmp_path / "out"
    weights = "ema" if file.startswith("ema") else "model"
    code, err = uvq_in_process("sample", "--prior", str(run), "--weights", weights, "--out", str(out), *SAMPLE, *CPU,
                               cwd=tmp_path)
    _refused_and_unwritten(code, err, out)


# ---------------------------------------------------------------------------------------------
# Nothing read from a file runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.fault("execution")
def test_pickle_payload_in_trainer_state_does_not_run(copy_of_trained, tmp_path):
    run = copy_of_trained("vqgan")
    marker = tmp_path / "PWNED"
    damage.pickle_payload(_ckpt(run) / "trainer.pt", marker)
    code, err = uvq_in_process("fit-vqgan", "demo", *TINY, "train.steps=12", "--out", str(run), "--resume", *CPU,
                               cwd=tmp_path)
    assert not marker.exists(), "the pickle payload in trainer.pt ran"
    assert_one_line_refusal(code, err)


@pytest.mark.fault("execution")
@pytest.mark.faults_full
@pytest.mark.parametrize("which", ["vqgan", "prior"])
def test_pickle_payload_in_an_imported_file_does_not_run(which, tmp_path):
    fixtures = REPO / "tests" / "fixtures" / "official"
    marker = tmp_path / "PWNED"
    evil = damage.pickle_payload(tmp_path / "evil.th", marker)
    files = {"vqgan": fixtures / "vqgan_ema_small.th", "prior": fixtures / "absorbing_ema_small.th", which: evil}
    out = tmp_path / "imported"
    code, err = uvq_in_process("import", "official", "--vqgan", str(files["vqgan"]), "--prior", str(files["prior"]),
                               "--heads", "4", "--out", str(out), *CPU, cwd=tmp_path)
    assert not marker.exists(), "the pickle payload in an imported file ran"
    _refused_and_unwritten(code, err, out)


@pytest.mark.fault("execution")
def test_pipe_source_in_checkpoint_metadata_does_not_run(copy_of_trained, tmp_path):
    run = copy_of_trained("vqgan")
    bad = _hostile().pipe_source(_ckpt(run), command="touch PWNED; false", out=tmp_path / "pipe-ckpt")
    code, err = uvq_in_process("encode", "--vqgan", str(bad), "--out", str(tmp_path / "L"), *CPU, cwd=tmp_path)
    assert not (tmp_path / "PWNED").exists(), "a pipe: source read from a checkpoint ran as a shell command"
    assert code in (0, 2) and "Traceback" not in err and "internal error" not in err, err[-2000:]


# ---------------------------------------------------------------------------------------------
# Bad data: latent shards, recipes, image folders, tars
# ---------------------------------------------------------------------------------------------


@pytest.mark.fault("data")
def test_codes_outside_the_codebook_are_refused(copy_of_trained, tmp_path):
    latents = damage.codes_out_of_range(copy_of_trained("latents"), CODEBOOK + 5)
    out = tmp_path / "prior"
    code, err = uvq_in_process("fit-prior", "demo", *TINY, "--latents", str(latents), "--out", str(out), *CPU,
                               cwd=tmp_path)
    _refused_and_unwritten(code, err, out)


@pytest.mark.fault("data")
def test_yaml_bomb_is_refused_quickly_in_one_line(tmp_path):
    bomb = damage.yaml_bomb(tmp_path / "bomb.yaml")
    done = uvq("config", "show", str(bomb), cwd=tmp_path, timeout=60, memory_gib=5)
    assert_one_line_refusal(done.returncode, done.stderr)
    assert len(done.stderr) < 1000, f"the error message echoes the expansion ({len(done.stderr)} characters)"


@pytest.mark.fault("data")
@pytest.mark.faults_full
@pytest.mark.parametrize("trick", ["duplicate_keys", "not_utf8"])
def test_malformed_recipe_is_refused_in_one_line(trick, tmp_path):
    recipe = tmp_path / "r.yaml"
    if trick == "duplicate_keys":
        recipe.write_text("train:\n  steps: 1\n  steps: 2\n")
    else:
        recipe.write_bytes(b"train:\n  steps: 1 # \xff\xfe\n")
    code, err = uvq_in_process("config", "show", str(recipe), cwd=tmp_path)
    assert_one_line_refusal(code, err)


def _encode_folder(trained, folder, out, cwd, timeout=240):
    return uvq("encode", "--vqgan", str(trained["vqgan"]), "--data", str(folder), "--out", str(out), "--no-flip-copies", "--recipe",
               "demo", *TINY, *CPU, cwd=cwd, timeout=timeout, memory_gib=8)


def _manifest_total(latents) -> int:
    return sum(json.loads((latents / "manifest.json").read_text())["num_samples"].values())


@pytest.mark.fault("data")
@pytest.mark.faults_full
def test_symlink_loop_in_an_image_folder_neither_hangs_nor_multiplies(trained, tmp_path):
    folder = damage.symlink_loop(tmp_path / "images")
    out = tmp_path / "L"
    done = _encode_folder(trained, folder, out, tmp_path)
    assert done.returncode in (0, 2) and "Traceback" not in done.stderr, done.stderr[-2000:]
    if done.returncode == 0:
        assert _manifest_total(out) == 12, f"12 images became {_manifest_total(out)} through the loop"


@pytest.mark.fault("data")
@pytest.mark.faults_full
def test_decompression_bomb_png_is_skipped_or_refused(trained, tmp_path):
    folder = damage.image_folder(tmp_path / "images")
    damage.decompression_bomb_png(folder / "bomb.png")
    out = tmp_path / "L"
    done = _encode_folder(trained, folder, out, tmp_path)
    assert done.returncode in (0, 2) and "Traceback" not in done.stderr, done.stderr[-2000:]
    if done.returncode == 0:
        assert _manifest_total(out) == 12, "the bomb was counted as an image"
        assert "bomb.png" in done.stderr, "the skipped bomb was not reported"


@pytest.mark.fault("data")
@pytest.mark.faults_full
def test_tar_traversal_in_an_image_shard_writes_nothing_outside(trained, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    members = {f"img{i:03d}.png": damage.png_bytes_of() for i in range(8)}
    members["../../escaped.png"] = damage.png_bytes_of()
    shard = damage.traversal_tar(work / "images-000000.tar", members)
    out = work / "L"
    done = _encode_folder(trained, shard, out, work)
    assert done.returncode in (0, 2) and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not any(p.name.startswith("escaped") for p in tmp_path.rglob("*") if work not in p.parents), \
        "a ../ member was written outside the output"


@pytest.mark.fault("data")
@pytest.mark.faults_full
def test_tar_traversal_in_a_latent_shard_is_refused(copy_of_trained, tmp_path):
    latents = copy_of_trained("latents")
    manifest = json.loads((latents / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["split"] == "train")
    buf = io.BytesIO()
    np.save(buf, np.zeros((8, 8), dtype=np.uint16))
    (latents / entry["name"]).unlink()
    damage.traversal_tar(latents / entry["name"], {"../../../escaped.codes.npy": buf.getvalue()})
    entry["sha256"], entry["num_samples"] = sha256_file(latents / entry["name"]), 1
    (latents / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "prior"
    code, err = uvq_in_process("fit-prior", "demo", *TINY, "--latents", str(latents), "--out", str(out), *CPU,
                               cwd=tmp_path)
    assert not list(tmp_path.parent.rglob("escaped*")), "a ../ member was written outside"
    assert code in (0, 2) and "Traceback" not in err and "internal error" not in err, err[-2000:]


# ---------------------------------------------------------------------------------------------
# --overwrite removes only what uvq wrote
# ---------------------------------------------------------------------------------------------


@pytest.mark.fault("ownership")
@pytest.mark.faults_full
@pytest.mark.parametrize("case", ["foreign_dir", "symlink_inside", "own_input"])
def test_overwrite_removes_only_what_uvq_wrote(case, trained, copy_of_trained, tmp_path):
    prior = copy_of_trained("prior")
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    if case == "foreign_dir":
        out = user
    elif case == "symlink_inside":
        out = tmp_path / "samples"
        code, err = uvq_in_process("sample", "--prior", str(prior), "--out", str(out), *SAMPLE, *CPU, cwd=tmp_path)
        assert code == 0, err
        os.symlink(user, out / "link")
    else:
        out = prior
    before = sorted(p.name for p in prior.rglob("*"))
    code, err = uvq_in_process("sample", "--prior", str(prior), "--out", str(out), *SAMPLE, *CPU, "--overwrite",
                               cwd=tmp_path)
    assert (user / "thesis.tex").is_file(), "--overwrite deleted a file uvq did not write"
    if case == "own_input":
        assert sorted(p.name for p in prior.rglob("*")) == before, "--overwrite deleted the command's own input"
    if case != "symlink_inside":
        assert_one_line_refusal(code, err)
    shutil.rmtree(tmp_path / "samples", ignore_errors=True)
