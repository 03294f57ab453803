"""`uvq pipeline`: stages in order, fingerprints, skipping, re-running what changed, resuming.

The stages are the real trainers at a tiny budget on the embedded demo data.
"""

from __future__ import annotations

import json

import pytest

from uvq.config import load_config
from uvq.pipeline import STAGES, fingerprint, run_pipeline, stage_inputs
from uvq.runtime import UserError

TINY = ["train.steps=2", "train.batch_size=4", "data.demo_images=32", "prior_train.steps=3",
        "prior_train.batch_size=8", "prior_train.val_every=3", "prior_train.val_batches=1", "prior_train.warmup_steps=1",
        "encode.batch_size=32", "sample.n=4", "sample.steps=4", "sample.batch_size=4", "run.log_every=1",
        "run.ckpt_every=1", "run.image_every=1000"]


def tiny(*extra: str):
    return load_config("demo", [*TINY, *extra])


def statuses(summary) -> dict[str, str]:
    return {stage: info["status"] for stage, info in summary["stages"].items()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipe") / "run"
    events = []
    summary = run_pipeline(tiny(), run, device="cpu", progress=events.append)
    return run, summary, events


def test_stages_run_in_order_into_their_directories(first_run):
    run, summary, events = first_run
    assert statuses(summary) == {s: "ran" for s in STAGES[:-1]}  # eval.metrics is [] in the demo recipe
    for stage in ("vqgan", "latents", "prior", "samples"):
        assert (run / stage).is_dir()
    assert not (run / "eval").exists()
    assert (run / "vqgan" / "checkpoints" / "last" / "meta.json").is_file()
    assert (run / "latents" / "manifest.json").is_file()
    assert summary["grid"] == str(run / "samples" / "grid.png") and (run / "samples" / "grid.png").is_file()
    assert len(list((run / "samples").glob("sample-*.png"))) == 4
    state = json.loads((run / "pipeline.json").read_text())
    assert all(state["stages"][s]["status"] == "done" for s in ("vqgan", "latents", "prior", "samples"))
    # the prior was trained on this run's latents and samples are decoded by this run's VQGAN
    samples = json.loads((run / "samples" / "samples.json").read_text())
    assert samples["vqgan"]["path"].startswith(str((run / "vqgan").resolve()))
    logs = [e["message"] for e in events if e.get("event") == "log" and e["message"].startswith("stage ")]
    assert [m.split()[1] for m in logs] == ["vqgan", "latents", "prior", "samples"]


def test_complete_stages_are_skipped_and_changes_rerun_what_follows(first_run):
    run, _, _ = first_run
    again = run_pipeline(tiny(), run, device="cpu")
    assert set(statuses(again).values()) == {"skipped"}
    # a sampling setting re-runs only the sample stage
    temp = run_pipeline(tiny("sample.temp=0.7"), run, device="cpu")
    assert statuses(temp) == {"vqgan": "skipped", "latents": "skipped", "prior": "skipped", "samples": "ran"}
    assert json.loads((run / "samples" / "samples.json").read_text())["temperature"] == 0.7
    # a prior setting re-runs the prior and everything after it
    lr = run_pipeline(tiny("sample.temp=0.7", "prior_train.lr=0.002"), run, device="cpu")
    assert statuses(lr) == {"vqgan": "skipped", "latents": "skipped", "prior": "ran", "samples": "ran"}
    # a damaged output is not trusted: the stage and those after it run again
    (run / "samples" / "samples.json").unlink()
    fixed = run_pipeline(tiny("sample.temp=0.7", "prior_train.lr=0.002"), run, device="cpu")
    assert statuses(fixed)["samples"] == "ran" and statuses(fixed)["prior"] == "skipped"


def test_until_stops_early_and_an_interrupted_stage_resumes(tmp_path):
    run = tmp_path / "run"
    partial = run_pipeline(tiny(), run, device="cpu", until="encode")
    assert list(statuses(partial)) == ["vqgan", "latents"]

    class Interrupt(Exception):
        pass

    seen = []

    def stop_after_first_step(event):
        if event.get("event") == "advance" and event.get("task") == "fit-prior":
            seen.append(event)
            if len(seen) == 2:  # step 2 is logged after step 1's checkpoint (log_every = ckpt_every = 1)
                raise Interrupt

    with pytest.raises(Interrupt):
        run_pipeline(tiny(), run, device="cpu", progress=stop_after_first_step)
    state = json.loads((run / "pipeline.json").read_text())
    assert state["stages"]["prior"]["status"] == "running"
    assert (run / "prior" / "checkpoints" / "last" / "meta.json").is_file()
    events = []
    resumed = run_pipeline(tiny(), run, device="cpu", progress=events.append)
    assert statuses(resumed) == {"vqgan": "skipped", "latents": "skipped", "prior": "resumed", "samples": "ran"}
    # the trainer continued from its step-1 checkpoint instead of starting over
    first = next(e for e in events if e.get("event") == "advance" and e.get("task") == "fit-prior")
    assert first["n"] == 1
    assert len((run / "prior" / "command.txt").read_text().splitlines()) == 2
    assert resumed["stages"]["prior"]["result"]["steps"] == 3


def test_fingerprints_follow_the_sections_each_stage_reads():
    base = tiny()
    fps = {s: fingerprint(base, s, "up") for s in STAGES}
    logging = tiny("run.log_every=7", "run.ckpt_every=9")
    assert {s: fingerprint(logging, s, "up") for s in STAGES} == fps
    prior = tiny("model.prior.n_layer=2")
    changed = {s for s in STAGES if fingerprint(prior, s, "up") != fps[s]}
    assert changed == {"prior"}
    assert fingerprint(base, "samples", "other-upstream") != fps["samples"]
    assert stage_inputs(tiny("sample.temp=0.5"), "samples")["sample"]["temp"] == 0.5


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="--until"):
        run_pipeline(tiny(), tmp_path / "r", device="cpu", until="fit-everything")
    with pytest.raises(UserError, match="eval"):
        run_pipeline(tiny(), tmp_path / "r", device="cpu", until="eval")  # no eval stage without metrics
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not made by uvq"):
        run_pipeline(tiny(), other, device="cpu")
    assert (other / "notes.txt").read_text() == "keep me"
