"""`fit-vqgan` end to end on a tiny VQGAN: the run directory, exact resume (also after SIGKILL),
bad images, output-directory rules, the CLI, and the EMA against its closed form."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_uvq
from PIL import Image
from safetensors.torch import load_file

from uvq.checkpoint import load_model, read_meta
from uvq.config import load_config
from uvq.ema import EMA
from uvq.runtime import UserError
from uvq.vqgan.train import check_fit_vqgan, fit_vqgan

# A tiny twin of the demo recipe: 16x16 images, 8x8 codes from 16 entries, a 1-layer PatchGAN.
TINY = [
    "model.vqgan.img_size=16", "model.vqgan.ch_mult=[1,2]", "model.vqgan.attn_resolutions=[8]",
    "model.vqgan.emb_dim=8", "model.vqgan.codebook_size=16", "model.discriminator.ndf=8",
    "model.discriminator.n_layers=1", "model.prior.codebook_size=16", "model.prior.latent_shape=[8,8]",
    "data.demo_images=64", "train.batch_size=2", "train.disc_start_step=2", "train.ema_every=2",
    "train.lr=0.001", "run.log_every=1", "run.image_every=3", "run.ckpt_every=3", "run.keep_last=2",
]
# Metrics that depend on wall time, not on the computation.
TIMING = {"images_per_s"}


def tiny(*extra: str):
    return load_config("demo", [*TINY, *extra])


def losses_only(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# The run directory of a short training
# ---------------------------------------------------------------------------------------------


def test_fit_vqgan_writes_a_complete_run_directory(tmp_path):
    events = []
    out = tmp_path / "run"
    summary = fit_vqgan(tiny("train.steps=7"), out, device="cpu", progress=events.append, argv=["uvq", "fit-vqgan", "x"])

    # Summary: steps, speed, final losses (D trained after disc_start_step), code usage, paths.
    assert summary["steps"] == 7 and summary["images_per_s"] > 0 and summary["bad_images"] == 0
    assert set(summary["final"]) >= {"loss", "l1", "codebook", "g_loss", "lambda", "d_loss"}
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["final"].values())
    assert 0 < summary["final"]["lambda"] <= 1.0  # the clamp lambda_max = 1
    assert 0 < summary["code_usage"] <= 1 and 1 <= summary["perplexity"] <= 16
    assert Path(summary["last_grid"]) == out / "images" / "recon-00000007.png"
    assert Path(summary["last_checkpoint"]) == (out / "checkpoints" / "step-00000007").resolve()

    # Files: config, command, env, metrics per log step, grids, checkpoints (last K kept).
    assert load_config(out / "config.yaml").to_dict() == tiny("train.steps=7").to_dict()
    assert (out / "command.txt").read_text() == "uvq fit-vqgan x\n"
    env = json.loads((out / "env.json").read_text())
    assert env["uvq_version"] and env["torch_version"] == torch.__version__ and env["world_size"] == 1
    assert env["device"] == "cpu" and "git_commit" in env
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 8))
    assert "d_loss" not in records[1] and "d_loss" in records[3]  # D learns from the step after step 2
    assert records[0]["lambda"] == 0.0 and records[2]["lambda"] > 0  # lambda on from disc_start_step
    assert sorted(p.name for p in (out / "images").iterdir()) == ["recon-00000003.png", "recon-00000006.png",
                                                                   "recon-00000007.png"]
    with Image.open(out / "images" / "recon-00000007.png") as im:
        # rows: inputs, reconstructions, EMA reconstructions; 16px images enlarged 4x to 64px cells,
        # 2px padding, and a left margin for the row labels (uvq.images.save_grid)
        w, h = im.size
        assert h == 3 * (4 * 16 + 2) + 2 and w > 2 * (4 * 16 + 2) + 2
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["last", "step-00000006", "step-00000007"]
    last = out / "checkpoints" / "step-00000007"
    assert {p.name for p in last.iterdir()} == {"model.safetensors", "ema.safetensors", "meta.json", "trainer.pt"}
    meta = read_meta(last)
    assert meta["kind"] == "vqgan" and meta["step"] == 7 and meta["default_weights"] == "ema"
    assert meta["provenance"]["data_source"] == "demo" and meta["provenance"]["images_seen"] == 14
    state = torch.load(last / "trainer.pt", weights_only=True)
    assert state["format"] == 2 and state["step"] == 7 and len(state["ranks"]) == 1
    assert set(state["optimizers"]) == set(state["scalers"]) == {"ae", "d"} and set(state["modules"]) == {"disc"}
    assert "weights" not in state["ema"]  # the EMA's weights live in ema.safetensors only

    # The checkpoint rebuilds the model from its own config; EMA and raw weights differ.
    model, _ = load_model(out, "vqgan", weights="model")
    ema_model, _ = load_model(out, "vqgan", weights="ema")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert model(x)[0].shape == (2, 3, 16, 16)
        assert not torch.equal(model(x)[0], ema_model(x)[0])

    # Progress: start, advances summing to the steps, end.
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and events[0]["total"] == 7
    assert sum(e["n"] for e in events if e["event"] == "advance") == 7
    assert any("l1" in e["metrics"] for e in events if e["event"] == "advance")


# ---------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------


def test_resume_continues_exactly(tmp_path):
    """k steps, then resume for m more: the same losses, step by step, as k+m straight."""
    cfg = tiny("train.steps=7", "run.ckpt_every=100")
    fit_vqgan(cfg, tmp_path / "straight", device="cpu")
    first = fit_vqgan(cfg, tmp_path / "split", device="cpu", max_steps=4)  # stops (and saves) at step 4
    assert first["steps"] == 4
    second = fit_vqgan(cfg, tmp_path / "split", device="cpu", resume=True)
    assert second["steps"] == 7 and second["steps_this_run"] == 3

    straight, split = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 8))
    assert losses_only(split) == losses_only(straight)  # exact float equality
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "straight" / "checkpoints" / "last" / name)
        b = load_file(tmp_path / "split" / "checkpoints" / "last" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_inside_a_log_window_logs_the_same_rows(tmp_path):
    """A stop between log steps (step 4 of windows 1-3, 4-6, 7) keeps the window in the checkpoint."""
    cfg = tiny("train.steps=7", "run.log_every=3", "run.ckpt_every=100")
    fit_vqgan(cfg, tmp_path / "straight", device="cpu")
    fit_vqgan(cfg, tmp_path / "split", device="cpu", max_steps=4)
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [3]
    fit_vqgan(cfg, tmp_path / "split", device="cpu", resume=True)
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [3, 6, 7]
    assert losses_only(read_metrics(tmp_path / "split")) == losses_only(read_metrics(tmp_path / "straight"))


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL between checkpoints resumes from its last one, exactly."""
    out = tmp_path / "killed"
    args = ["fit-vqgan", "demo", *TINY, "run.ckpt_every=2", "--out", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "uvq", *args, "train.steps=100000"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert len(read_metrics(out)) >= 5
    last = int(read_meta(out)["step"])
    assert last >= 4 and last % 2 == 0

    done = run_uvq(*args, "train.steps=8", "--resume", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 8
    assert "resumed" in done.stderr

    fit_vqgan(tiny("train.steps=8", "run.ckpt_every=2"), tmp_path / "straight", device="cpu")
    assert losses_only(read_metrics(out)) == losses_only(read_metrics(tmp_path / "straight"))
    assert len((out / "command.txt").read_text().splitlines()) == 2  # the start and the resume


def test_resume_refuses_a_different_model(tmp_path):
    fit_vqgan(tiny("train.steps=1"), tmp_path / "run", device="cpu")
    with pytest.raises(UserError, match="model config differs"):
        fit_vqgan(tiny("train.steps=2", "model.vqgan.emb_dim=4"), tmp_path / "run", device="cpu", resume=True)


# ---------------------------------------------------------------------------------------------
# Output directory rules, bad images
# ---------------------------------------------------------------------------------------------


def test_refuses_a_non_empty_out_without_resume_or_overwrite(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for kw in ({}, {"resume": True}, {"overwrite": True}):  # not ours: neither --resume nor --overwrite is a way in
        with pytest.raises(UserError, match="not made by uvq"):
            fit_vqgan(tiny("train.steps=1"), foreign, device="cpu", **kw)
    assert (foreign / "notes.txt").read_text() == "mine"

    ours = tmp_path / "ours"
    fit_vqgan(tiny("train.steps=1"), ours, device="cpu")
    with pytest.raises(UserError, match="--resume"):
        fit_vqgan(tiny("train.steps=1"), ours, device="cpu")
    summary = fit_vqgan(tiny("train.steps=1"), ours, device="cpu", overwrite=True)
    assert summary["steps"] == 1 and len(read_metrics(ours)) == 1


def _image_folder(root: Path, good: int, bad: int) -> Path:
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(good):
        arr = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"good{i}.png")
    for i in range(bad):
        (root / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def test_bad_images_are_skipped_and_counted(tmp_path):
    folder = _image_folder(tmp_path / "images", good=6, bad=2)
    events = []
    cfg = tiny("train.steps=4", f"data.source={folder}", "data.val_fraction=0.0")
    summary = fit_vqgan(cfg, tmp_path / "run", device="cpu", progress=events.append)
    assert summary["bad_images"] >= 2  # 8 images per epoch, 8 drawn in 4 steps of 2
    assert read_metrics(tmp_path / "run")[-1]["bad_images"] == summary["bad_images"]
    assert any(e["event"] == "warn" and "unreadable image" in e["message"] for e in events)

    strict = load_config("demo", [*TINY, "train.steps=4", f"data.source={folder}", "data.val_fraction=0.0",
                                  "data.strict=true"])
    with pytest.raises(UserError, match="unreadable image"):
        fit_vqgan(strict, tmp_path / "strict", device="cpu")


def test_check_validates_without_writing(tmp_path, monkeypatch):
    plan = check_fit_vqgan(tiny(), tmp_path / "new", device="cpu")
    assert plan["vqgan_params"] > 0 and plan["disc_params"] > 0 and not (tmp_path / "new").exists()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no VGG16 file there
    with pytest.raises(UserError, match="vgg16-397923af.pth"):
        check_fit_vqgan(tiny("train.perceptual_weight=1.0"), tmp_path / "new", device="cpu")
    with pytest.raises(UserError, match="vgg16-397923af.pth"):  # fails before the run dir is taken
        fit_vqgan(tiny("train.perceptual_weight=1.0"), tmp_path / "new", device="cpu")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------


def test_cli_fit_vqgan_trains_and_reports(tmp_path):
    out = tmp_path / "cli-run"
    res = run_uvq("fit-vqgan", "recipes/demo.yaml", *TINY, "train.steps=3", "--out", str(out), "--device", "cpu",
                  "--seed", "3", "--json", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["steps"] == 3 and Path(summary["last_grid"]).is_file()
    assert (Path(summary["last_checkpoint"]) / "model.safetensors").is_file()
    assert load_config(out / "config.yaml").run.seed == 3
    assert (out / "command.txt").read_text().startswith("uvq fit-vqgan recipes/demo.yaml")
    assert all(json.loads(line)["event"] for line in res.stderr.splitlines() if line.startswith("{"))

    again = run_uvq("fit-vqgan", "recipes/demo.yaml", *TINY, "--out", str(out), "--device", "cpu")
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr

    dry = run_uvq("fit-vqgan", "recipes/demo.yaml", *TINY, "--out", str(tmp_path / "dry"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "img_size: 16" in dry.stdout and "nothing was written" in dry.stdout
    assert not (tmp_path / "dry").exists()


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------


def test_ema_matches_its_closed_form():
    """Updates at steps that are multiples of `every` from `start` on: e <- beta e + (1-beta) theta."""
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, beta=0.9, every=2, start=4)
    expected = model.weight.detach().clone()
    for step in range(1, 11):
        with torch.no_grad():
            model.weight.add_(1.0)  # a known trajectory theta_step = theta_0 + step
        ema.update(model, step)
        theta = model.weight.detach()
        if step < 4:
            expected = theta.clone()  # before start the copy follows the weights
        elif step % 2 == 0:
            expected = 0.9 * expected + 0.1 * theta
        assert torch.allclose(ema.model.weight, expected, atol=1e-6), step
    assert ema.num_updates == 4  # steps 4, 6, 8, 10
    assert not ema.model.weight.requires_grad

    restored = EMA(torch.nn.Linear(3, 2), beta=0.9, every=2, start=4)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.model.weight, ema.model.weight) and restored.num_updates == 4
    with pytest.raises(ValueError, match="no weights"):
        restored.load_state_dict(ema.state_dict(weights=False))
