"""`uvq eval sweep` (paper Table 3): a 2x2 grid on tiny models, its files, a cached rerun, a real
kill and a resume that gives the table of an uninterrupted sweep.

The feature extractor is torch-fidelity's own Inception module with random weights, written as a
weights file by the test (as tests/test_evaluate.py does), and passed with --inception-weights.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_uvq
from PIL import Image
from test_sampling import make_checkpoints

from uvq.config import EvalConfig, SampleConfig, SweepConfig
from uvq.evaluation.sweep import default_steps, sweep_grid, sweep_table
from uvq.runtime import UserError

GRID = ["--steps", "4,16", "--temps", "0.8,1.0", "-n", "3", "eval.k=2", "eval.batch_size=8"]


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """torch-fidelity's Inception module with He-initialised random weights, saved as its weights file.

    Building the module needs weights, so its loader is bypassed only to make the file."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        module = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(0)
    state = module.state_dict()
    for key, value in state.items():
        if key.endswith("conv.weight") or key == "fc.weight":
            value.copy_(torch.randn(value.shape, generator=gen) * (2.0 / value[0].numel()) ** 0.5)
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_checkpoints(root / "run")  # a 16 px VQGAN with 16 codes, a prior over 8x8 = 64 tokens
    ref = root / "reference"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    (root / "cache").mkdir()  # the feature cache the in-process sweeps share
    return root


@pytest.fixture(scope="module")
def whole(models, inception_file) -> tuple[Path, dict]:
    """The uninterrupted 2x2 sweep, run once for the tests below."""
    out = models / "whole"
    res = _sweep(models, inception_file, out, "--json")
    assert res.returncode == 0, res.stderr
    return out, json.loads(res.stdout)


def _sweep(models, inception_file, out, *extra, cache=None):
    return run_uvq("eval", "sweep", "--run-dir", str(models / "run"), "--reference", str(models / "reference"),
                   *GRID, "--inception-weights", str(inception_file), "--cache-dir", str(cache or models / "cache"),
                   "--out", str(out), "--device", "cpu", *extra)


def test_default_grid_is_table_3():
    assert default_steps(256) == [50, 100, 150, 200, 256]
    assert default_steps(16) == [3, 6, 9, 12, 16]
    cells = sweep_grid(SweepConfig(), SampleConfig(temp=0.8), 256)
    assert [(c.steps, c.temp) for c in cells] == [(s, 0.8) for s in (50, 100, 150, 200, 256)]
    with pytest.raises(UserError, match=r"sweep.steps \[300\] lie outside 1..N=256"):
        sweep_grid(SweepConfig(steps=[50, 300]), SampleConfig(), 256)


def test_table_has_table_3s_shape():
    results = [{"steps": s, "temp": t, "n": 10, "results": {"fid": s + t, "precision": 0.5}}
               for t in (0.9, 1.0) for s in (100, 50)]
    table = sweep_table(results, ["fid", "precision"])
    lines = table.splitlines()
    assert lines[0] == "| Steps | 50 | 100 |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| FID, temp 0.9 | 50.90 | 100.90 |"
    assert lines[5] == "| precision, temp 1 | 0.5000 | 0.5000 |"


def test_sweep_2x2_files_and_cached_rerun(tmp_path, models, inception_file, whole):
    out, summary = whole
    assert summary["cells"] == 4 and summary["cells_run"] == 4 and summary["cells_reused"] == 0

    # The CSV: one row per cell, the metrics equal to `uvq eval fid/prdc` on the cell's samples.
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["steps"], r["temp"]) for r in rows] == [("4", "0.8"), ("16", "0.8"), ("4", "1"), ("16", "1")]
    cell = out / "cells" / "steps00004-temp0.8"
    assert len(list(cell.glob("sample-*.png"))) == 3
    samples_json = json.loads((cell / "samples.json").read_text())
    assert samples_json["steps"] == 4 and samples_json["temperature"] == 0.8 and samples_json["seed"] == 0
    fid = run_uvq("eval", "fid", "--samples", str(cell), "--reference", str(models / "reference"),
                  "--inception-weights", str(inception_file), "--cache-dir", str(models / "cache"),
                  "--out", str(tmp_path / "fid"), "--device", "cpu", "--json")
    assert fid.returncode == 0, fid.stderr
    assert float(rows[0]["fid"]) == json.loads(fid.stdout)["results"]["fid"]
    prdc = run_uvq("eval", "prdc", "--samples", str(cell), "--reference", str(models / "reference"), "--k", "2",
                   "--inception-weights", str(inception_file), "--cache-dir", str(models / "cache"),
                   "--out", str(tmp_path / "fid"), "--device", "cpu", "--json")
    assert prdc.returncode == 0, prdc.stderr
    assert float(rows[0]["precision"]) == json.loads(prdc.stdout)["results"]["precision"]
    # a chain of S steps costs at most S network passes per image
    assert float(rows[0]["network_passes_per_image"]) <= 4 and float(rows[1]["network_passes_per_image"]) <= 16

    table = (out / "sweep.md").read_text()
    assert table.startswith("| Steps | 4 | 16 |\n|---|---|---|\n| FID, temp 0.8 |")
    assert "| coverage, temp 1 |" in table
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(out / "sweep.png").size[0] > 400

    # A rerun skips every finished cell and writes the same table.
    again = _sweep(models, inception_file, out, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["cells_reused"] == 4
    assert (out / "sweep.md").read_text() == table
    # Another temperature grid (in a copy of the sweep) reuses the cells it shares.
    shutil.copytree(out, tmp_path / "more")
    more = run_uvq("eval", "sweep", "--run-dir", str(models / "run"), "--reference", str(models / "reference"),
                   "--steps", "4", "--temps", "1.0,1.2", "-n", "3", "eval.k=2", "--inception-weights",
                   str(inception_file), "--cache-dir", str(models / "cache"), "--out", str(tmp_path / "more"),
                   "--device", "cpu", "--json")
    assert more.returncode == 0, more.stderr
    assert json.loads(more.stdout)["cells_reused"] == 1 and "temp 1.2" in (tmp_path / "more" / "sweep.md").read_text()


def test_killed_sweep_resumes_to_the_same_table(tmp_path, models, inception_file, whole):

    # The same sweep in a subprocess (its own feature cache, so it has real work to do), killed
    # with SIGKILL as soon as its first cell is finished.
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "uvq", "eval", "sweep", "--run-dir", str(models / "run"),
           "--reference", str(models / "reference"), *GRID, "--inception-weights", str(inception_file),
           "--cache-dir", str(tmp_path / "cache-killed"), "--out", str(killed), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list((killed / "cells").glob("*.json")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = list((killed / "cells").glob("*.json"))
    assert 1 <= len(done) < 4 and not (killed / "sweep.md").exists()

    # The rerun keeps the finished cells, redoes the rest (a half-written cell included) and
    # gives the table of the uninterrupted sweep.
    # (The shared feature cache holds the uninterrupted sweep's features: the redone cells'
    # samples are the same images, so their features come from it.)
    res = _sweep(models, inception_file, killed, "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["cells_reused"] == len(done) and summary["cells_run"] == 4 - len(done)
    assert (killed / "sweep.md").read_text() == (whole[0] / "sweep.md").read_text()
    assert (killed / "sweep.csv").read_text().count("\n") == 5


def test_refusals_change_nothing(tmp_path, models, inception_file):
    out = tmp_path / "sweep"
    cases = [
        (["--steps", "4,65"], "sweep.steps [65] lie outside 1..N=64"),
        (["--steps", "4,x"], "--steps takes comma-separated integers"),
        (["--temps", "0"], "sweep.temps[0] must be between"),
        (["sweep.metrics=[fid,lpips]"], "sweep.metrics must be distinct entries of"),
        (["sample.sampler=nope.v1"], "sample.sampler: unknown samplers name"),
        (["sample.options.shape=[2]", "sample.sampler=halton.v1"], "sample.options.shape must be two integers"),
        (["steps=4"], "this command takes sweep.KEY=VALUE, sample.KEY=VALUE or eval.KEY=VALUE"),
        (["sweep.n=2", "eval.k=2", "--steps", "4"], "PRDC's eval.k=2 needs more than k samples per cell"),
    ]
    for extra, message in cases:
        res = run_uvq("eval", "sweep", "--run-dir", str(models / "run"), "--reference", str(models / "reference"),
                      "--inception-weights", str(inception_file), "--out", str(out), "-n", "3", *extra)
        assert res.returncode == 2, (extra, res.stderr)
        assert message in res.stderr, (extra, res.stderr)
        assert len(res.stderr.strip().splitlines()) <= 5 and "Traceback" not in res.stderr
        assert not out.exists()
    missing = run_uvq("eval", "sweep", "--run-dir", str(models / "run"), "--reference", str(tmp_path / "nope"),
                      "--inception-weights", str(inception_file), "--out", str(out), "--steps", "4")
    assert missing.returncode == 2 and not out.exists()
    no_weights = run_uvq("eval", "sweep", "--run-dir", str(models / "run"), "--reference", str(models / "reference"),
                         "--inception-weights", str(tmp_path / "none.pth"), "--out", str(out), "--steps", "4")
    assert no_weights.returncode == 2 and "Inception weights file" in no_weights.stderr and not out.exists()
    # a directory that is not a sweep's is refused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    res = _sweep(models, inception_file, foreign)
    assert res.returncode == 2 and "not made by uvq" in res.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_library_call_takes_the_sections(tmp_path, models, inception_file):
    from uvq.checkpoint import find_prior
    from uvq.evaluation.sweep import run_sweep

    ckpt, _ = find_prior(run=models / "run")
    summary = run_sweep(ckpt, tmp_path / "lib", sweep=SweepConfig(steps=[16], temps=[1.0], n=3, metrics=["fid"]),
                        sample=SampleConfig(sampler="halton.v1"), reference=str(models / "reference"),
                        cfg_eval=EvalConfig(inception_weights=str(inception_file)), device="cpu",
                        cache_dir=models / "cache")
    assert summary["cells"] == 1 and summary["sample"]["sampler"] == "halton.v1"
    assert json.loads((tmp_path / "lib" / "cells" / "steps00016-temp1" / "samples.json").read_text())["sampler"] == "halton.v1"
    assert list(csv.DictReader((tmp_path / "lib" / "sweep.csv").open()))[0].keys() >= {"fid", "steps", "temp"}
