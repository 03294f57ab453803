"""`uvq report RUN`: the page of every kind of run directory, escaping, refusals, and a real browser.

The directories are real: a tiny pipeline on the demo data (with `run.report: true`, so that the
trainers refresh their pages), then `upscale-canvas`, `inpaint`, `eval elbo` and `eval recon` on it.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run_uvq

from uvq.files import read_record

TINY = ["train.steps=4", "train.batch_size=4", "data.demo_images=32", "prior_train.steps=4",
        "prior_train.batch_size=8", "prior_train.val_every=2", "prior_train.val_batches=1", "prior_train.warmup_steps=1",
        "encode.batch_size=32", "sample.n=4", "sample.steps=4", "sample.batch_size=4", "run.log_every=1",
        "run.ckpt_every=2", "run.image_every=2", "run.report=true"]
IMG = re.compile(r'<img src="([^"]*)"')


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    pipe = root / "pipe"
    res = run_uvq("--json", "pipeline", "demo", *TINY, "--out", str(pipe), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    refreshed = {s: (pipe / s / "report.html").is_file() for s in ("vqgan", "prior")}
    prior = str(pipe / "prior")
    for args in (["upscale-canvas", "--prior", prior, "--latent-size", "8x12", "-n", "2", "--steps", "4",
                  "--out", str(root / "canvas")],
                 ["inpaint", str(pipe / "samples" / "sample-000000.png"), "--box", "8,8,24,24", "--prior", prior,
                  "-n", "2", "--steps", "4", "--out", str(root / "inpaint")],
                 ["eval", "elbo", "--prior", prior, "--latents", str(pipe / "latents"), "--out", str(root / "elbo")],
                 # without --out: into the VQGAN's run directory, whose report then shows it
                 ["eval", "recon", "--vqgan", str(pipe / "vqgan"), "--data", "demo", "--no-lpips", "--no-fid"]):
        res = run_uvq(*args)
        assert res.returncode == 0, res.stderr
    return {"root": root, "pipe": pipe, "summary": summary, "refreshed": refreshed}


def _report(path: Path) -> str:
    res = run_uvq("report", str(path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"report: {path / 'report.html'}"
    assert "report.html" in read_record(path)["entries"]  # uvq's: --overwrite of the run removes it
    return (path / "report.html").read_text()


def _images(page: str) -> list[bytes]:
    srcs = IMG.findall(page)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    return [base64.b64decode(s.split(",", 1)[1]) for s in srcs]


def test_pipeline_writes_its_report_at_the_end_and_links_every_stage(runs):
    pipe = runs["pipe"]
    assert runs["summary"]["report"] == str(pipe / "report.html")
    page = (pipe / "report.html").read_text()
    for stage in ("vqgan", "latents", "prior", "samples"):
        assert f'href="#stage-{stage}"' in page and f'id="stage-{stage}"' in page
    assert "report.html" in read_record(pipe)["entries"]
    # the stage sections carry the stages' own images: the sample grid, byte for byte
    assert (pipe / "samples" / "grid.png").read_bytes() in _images(page)


def test_training_commands_refresh_their_report_with_run_report(runs):
    assert runs["refreshed"] == {"vqgan": True, "prior": True}


def test_training_reports_show_curves_grids_config_and_provenance(runs):
    pipe = runs["pipe"]
    page = _report(pipe / "vqgan")
    images = _images(page)
    recon = sorted((pipe / "vqgan" / "images").glob("recon-*.png"))
    assert len(recon) == 2 and all(p.read_bytes() in images for p in recon)  # the strip over training
    assert "step 2" in page and "step 4" in page
    for text in ("Provenance", "uvq_version", "weights sha256 (ema), the tokenizer hash", "Curves",
                 "training: loss", "learning rate: lr", "throughput: images_per_s", "Checkpoints",
                 "against recipe demo as it reads now", "train.steps"):
        assert text in page, text
    meta = json.loads((pipe / "vqgan" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["weights_sha256"]["ema"] in page
    prior = _report(pipe / "prior")
    assert "validation: val_elbo_bits_per_token" in prior and "Loss by time step" in prior
    tok = json.loads((pipe / "latents" / "manifest.json").read_text())["tokenizer"]["sha256"]
    assert tok in prior
    loss_by_t = sorted((pipe / "prior" / "images").glob("loss-by-t-*.png"))[-1]
    assert loss_by_t.read_bytes() in _images(prior)


def test_generation_and_eval_reports(runs):
    root, pipe = runs["root"], runs["pipe"]
    page = _report(pipe / "samples")
    samples = json.loads((pipe / "samples" / "samples.json").read_text())
    assert samples["prior"]["sha256"] in page and "Timing" in page and "temperature=0.9" in page
    canvas = _report(root / "canvas")
    assert (root / "canvas" / "grid.png").read_bytes() in _images(canvas) and "canvas.window" in canvas
    inpaint = _report(root / "inpaint")
    grid = json.loads((root / "inpaint" / "inpaint.json").read_text())["inputs"][0]["grid"]
    assert (root / "inpaint" / grid).read_bytes() in _images(inpaint)
    elbo = _report(root / "elbo")
    stats = json.loads((root / "elbo" / "elbo.json").read_text())
    row = re.search(r"<td>mean</td><td>([^<]+)</td><td>([^<]+)</td>", elbo)
    assert row and float(row.group(1)) == pytest.approx(stats["mean"], rel=1e-3)
    assert float(row.group(2)) == pytest.approx(stats["mean_stderr"], rel=1e-3)
    recon = _report(pipe / "vqgan")  # `eval recon` wrote into the VQGAN's run directory
    assert (pipe / "vqgan" / "recon-val.png").read_bytes() in _images(recon) and "psnr" in recon
    latents = _report(pipe / "latents")
    assert "tokenizer sha256" in latents


def test_strings_from_the_run_are_escaped(runs, tmp_path):
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    run = tmp_path / "<b>run</b>"
    shutil.copytree(runs["pipe"] / "prior", run, symlinks=True)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["source"] = hostile
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 99, hostile: 1.0}) + "\n")
    (run / "command.txt").write_text(f"uvq fit-prior demo 'data.source={hostile}'\n")
    page = _report(run)
    assert hostile not in page and "<b>run</b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<script" not in page.lower() and "onerror=" not in page.replace("onerror=alert(1)&gt;", "")


def test_bad_run_directories_are_refused_in_one_line_and_nothing_is_written(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for path, why in ((tmp_path / "missing", "is not a directory"), (foreign, "was not made by uvq"),
                      (foreign / "notes.txt", "is not a directory")):
        res = run_uvq("report", str(path))
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and why in res.stderr, res.stderr
        assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    encoded = tmp_path / "other"
    encoded.mkdir()
    (encoded / ".uvq").write_text(json.dumps({"format": "uvq-output-dir", "command": "neighbours", "entries": []}))
    res = run_uvq("report", str(encoded))
    assert res.returncode == 2 and "has no report" in res.stderr
    assert sorted(p.name for p in encoded.iterdir()) == [".uvq"]


def test_a_running_command_holding_the_lock_is_not_written_over(runs, tmp_path):
    from uvq.files import DirLock

    run = tmp_path / "samples"
    shutil.copytree(runs["pipe"] / "samples", run)
    (run / "report.html").unlink(missing_ok=True)
    held = DirLock(run, "sample").acquire()
    try:
        res = run_uvq("report", str(run))
    finally:
        held.release()
    assert res.returncode == 2 and "is in use by `uvq sample`" in res.stderr
    assert not (run / "report.html").exists()


def test_the_report_renders_offline_in_a_real_browser(runs, browser, tmp_path):
    pipe = runs["pipe"]
    page = (pipe / "report.html").read_text()
    assert "<link" not in page and not re.search(r"<script[^>]*src", page) and "http://" not in page
    browser.get((pipe / "report.html").as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt]);")
    assert len(images) >= 6
    assert all(done and width > 0 for done, width, _ in images), images
    names = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert all(n.startswith(("data:", "file:")) for n in names), names
    assert browser.execute_script("return document.querySelectorAll('link, script[src], iframe').length;") == 0
    assert browser.find_element("id", "stage-prior").is_displayed()
    browser.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 0
