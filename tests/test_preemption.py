"""Preemption: a signal or the time limit stops a long command with its state saved (exit 75), and
`--resume auto` (or a plain re-run) continues to exactly the result of a run never stopped.

SLURM warns a job with SIGTERM (and SIGUSR1 with `--signal=USR1@90`) before its time limit or a
preemption (docs/reliability.md, "Signals and time limits"). Each case runs the real `python -m uvq`
in a subprocess, sends the signal at a seeded moment (after a seeded number of logged steps), then
restarts and compares weights (safetensors), metrics.jsonl without its timing fields, shards and PNG
bytes with an uninterrupted run, read as plain files (tests/faults/harness.py).
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults.harness import (
    REPO,
    SEED,
    TINY,
    Moment,
    assert_same_metrics,
    assert_same_weights,
    count_files,
    count_lines,
    env,
    interrupt,
    leftovers,
    png_bytes,
    shard_contents,
    uvq_in_process,
    weights_of,
)

from uvq.config import load_config
from uvq.errors import EXIT_REQUEUE
from uvq.runtime import UserError
from uvq.stopping import StopRequest, parse_time_limit
from uvq.training import resolve_resume

CPU = ["--device", "cpu"]
ENCODE = ["data.demo_images=256"]
SAMPLE = ["-n", "120", "--steps", "8", "--batch-size", "4", "--seed", "0"]


# ---------------------------------------------------------------------------------------------
# The uninterrupted chain: every command once, the references of the cases below
# ---------------------------------------------------------------------------------------------


def _args(name: str, chain, out) -> list[str]:
    if name == "fit-vqgan":
        return ["fit-vqgan", "demo", *TINY, "--out", str(out), *CPU]
    if name == "fit-prior":
        return ["fit-prior", "demo", *TINY, "--latents", str(chain["latents"]), "--vqgan", str(chain["fit-vqgan"]),
                "--out", str(out), *CPU]
    if name == "encode":
        return ["encode", "--vqgan", str(chain["fit-vqgan"]), "--out", str(out), "--recipe", "demo", *TINY, *ENCODE, *CPU]
    return ["sample", "--prior", str(chain["fit-prior"]), "--out", str(out), *SAMPLE, *CPU]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """{command: its uninterrupted output}: fit-vqgan, encode (as "latents"), fit-prior, sample."""
    root = tmp_path_factory.mktemp("chain")
    done: dict = {}
    for name, key in (("fit-vqgan", "fit-vqgan"), ("encode", "latents"), ("fit-prior", "fit-prior"),
                      ("sample", "sample")):
        args = _args(name, done, root / key)
        code, err = uvq_in_process(*args, cwd=REPO)
        assert code == 0, f"the uninterrupted {name} failed:\n{err}"
        done[key] = root / key
    return done


def _step_of(run) -> int:
    return json.loads((run / "checkpoints" / "last" / "meta.json").read_text())["step"]


def _assert_stopped(got, sig_name: str) -> None:
    assert got.reached, f"the command ended (exit {got.code}) before the signal:\n{got.stderr[-1500:]}"
    assert got.code == EXIT_REQUEUE, f"exit {got.code}, expected {EXIT_REQUEUE}:\n{got.stderr[-2000:]}"
    assert "Traceback" not in got.stderr, got.stderr[-2000:]
    lines = [ln for ln in got.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and f"on {sig_name}" in lines[0], got.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# The trainers: a signal at a seeded step, then `--resume auto`, equals a run never stopped
# ---------------------------------------------------------------------------------------------

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
DEFAULT = {("fit-vqgan", "SIGTERM"), ("fit-prior", "SIGUSR1")}  # the other four are faults_full


def _training_cases():
    for name in ("fit-vqgan", "fit-prior"):
        for sig in SIGNALS:
            marks = [] if (name, sig.name) in DEFAULT else [pytest.mark.faults_full]
            yield pytest.param(name, sig, marks=marks, id=f"{name}-{sig.name}")


@pytest.mark.parametrize(("name", "sig"), list(_training_cases()))
def test_a_signal_saves_and_resume_auto_continues_exactly(name, sig, chain, tmp_path):
    rng = random.Random(f"{SEED}-preempt-{name}-{sig.name}")
    out = tmp_path / "run"
    args = [*_args(name, chain, out), "--resume", "auto"]  # the first start of a job script's one line
    moment = Moment.draw(rng, False, max_lines=12)
    got = interrupt(args, sig, moment, cwd=REPO, progress=count_lines(out / "metrics.jsonl"), watch=[out])
    _assert_stopped(got, sig.name)
    # At most the step in progress is lost: the checkpoint is at or after the last logged step.
    stopped_at = _step_of(out)
    assert moment.lines <= stopped_at < 16, (moment.lines, stopped_at)
    assert f"stopped at step {stopped_at} " in got.stderr

    code, err = uvq_in_process(*args, cwd=REPO)  # the requeued job: the same line
    assert code == 0, err
    assert_same_weights(weights_of(out), weights_of(chain[name]))
    assert_same_metrics(out, chain[name])
    assert not leftovers(out)


def test_a_second_signal_stops_at_once(chain, tmp_path):
    """SIGUSR1 asks the loop to stop; a SIGTERM before it has stopped ends the process with 143."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "uvq", *_args("fit-prior", chain, out)], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = count_lines(out / "metrics.jsonl")
    deadline = time.monotonic() + 240
    while lines() < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "fit-prior ended before the signals"
    proc.send_signal(signal.SIGUSR1)
    proc.send_signal(signal.SIGTERM)  # pending together: Python runs the handlers in signal-number order
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "interrupted by SIGTERM" in stderr and "Traceback" not in stderr, stderr[-2000:]


def test_the_time_limit_stops_with_a_checkpoint(chain, tmp_path):
    out = tmp_path / "run"
    args = [*_args("fit-prior", chain, out), "prior_train.steps=100000", "run.stop_margin_s=0", "--time-limit", "6"]
    t0 = time.monotonic()
    code, err = uvq_in_process(*args, cwd=REPO)
    assert code == EXIT_REQUEUE, err
    assert time.monotonic() - t0 < 60
    step = _step_of(out)
    assert f"stopped at step {step} on time limit" in err, err
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] <= step  # logged steps never pass the resume point


# ---------------------------------------------------------------------------------------------
# Two ranks (torch.distributed on gloo, the environment torchrun sets): a signal to one rank only
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(args: list[str], port: int) -> list[subprocess.Popen]:
    procs = []
    for rank in (0, 1):
        e = {**env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
             "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "-m", "uvq", *args], cwd=REPO, env=e,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    errs = [p.communicate(timeout=240)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errs, strict=True)]


@pytest.mark.parametrize("exact", [False, pytest.param(True, marks=pytest.mark.faults_full)],
                         ids=["agree", "agree-and-resume-exactly"])
def test_two_ranks_agree_on_the_stop_step_and_resume_exactly(chain, tmp_path, exact):
    """The default suite checks the agreement (2 processes); `faults_full` adds the resume and a
    straight 2-rank run to compare with (4 more)."""
    prior = [*_args("fit-prior", chain, tmp_path / "x")[:-4], "run.stop_check_every=2"]  # without --out, --device
    straight, out = tmp_path / "straight", tmp_path / "run"
    rng = random.Random(f"{SEED}-preempt-ddp")
    at = rng.randint(2, 10)
    procs = _ranks([*prior, "--out", str(out), *CPU, "--resume", "auto"], _free_port())
    lines = count_lines(out / "metrics.jsonl")
    deadline = time.monotonic() + 240
    while lines() < at and procs[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    procs[1].send_signal(signal.SIGTERM)  # rank 1 only: rank 0 learns of it through the all-reduce
    stopped = _wait(procs)
    assert [c for c, _ in stopped] == [EXIT_REQUEUE, EXIT_REQUEUE], stopped[0][1][-1500:] + stopped[1][1][-1500:]
    step = _step_of(out)
    assert step % 2 == 0 and at <= step < 16, step  # a step both ranks check on (run.stop_check_every)
    assert all(f"stopped at step {step} on SIGTERM" in err for _, err in stopped)
    if not exact:
        return
    ran = _wait(_ranks([*prior, "--out", str(straight), *CPU], _free_port()))
    assert [c for c, _ in ran] == [0, 0], ran[0][1][-1500:] + ran[1][1][-1500:]
    again = _wait(_ranks([*prior, "--out", str(out), *CPU, "--resume", "auto"], _free_port()))
    assert [c for c, _ in again] == [0, 0], again[0][1][-1500:]
    assert_same_weights(weights_of(out), weights_of(straight))
    assert_same_metrics(out, straight)


# ---------------------------------------------------------------------------------------------
# encode and sample: stopped after the shard or batch in progress, then re-run
# ---------------------------------------------------------------------------------------------


def test_encode_stops_after_its_shard_and_a_rerun_writes_the_same_shards(chain, tmp_path):
    out = tmp_path / "latents"
    args = _args("encode", chain, out)
    moment = Moment.draw(random.Random(f"{SEED}-preempt-encode"), False, max_lines=3)
    got = interrupt(args, signal.SIGTERM, moment, cwd=REPO, progress=count_files(out, "*.tar"), watch=[out])
    _assert_stopped(got, "SIGTERM")
    assert not (out / "manifest.json").exists() and not leftovers(out)  # only finished shards are there
    code, err = uvq_in_process(*args, cwd=REPO)
    assert code == 0, err
    assert shard_contents(out) == shard_contents(chain["latents"])


def test_sample_stops_after_its_batch_and_a_rerun_writes_the_same_images(chain, tmp_path):
    out = tmp_path / "samples"
    args = _args("sample", chain, out)
    moment = Moment.draw(random.Random(f"{SEED}-preempt-sample"), False, max_lines=12)
    got = interrupt(args, signal.SIGINT, moment, cwd=REPO, progress=count_files(out, "sample-*.png"), watch=[out])
    _assert_stopped(got, "SIGINT")
    written = png_bytes(out)
    assert 0 < len(written) < 120 and len(written) % 4 == 0  # whole batches of 4, each PNG complete
    assert all(written[k] == v for k, v in png_bytes(chain["sample"]).items() if k in written)
    code, err = uvq_in_process(*args, "--overwrite", cwd=REPO)
    assert code == 0, err
    assert png_bytes(out) == png_bytes(chain["sample"])


# ---------------------------------------------------------------------------------------------
# The pieces: time formats, --resume auto, the stop request
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [(90, 90.0), (2.5, 2.5), ("45:00", 2700.0), ("12:00:00", 43200.0),
                                               ("1-12:00:00", 129600.0), ("2-06", 194400.0), ("0-00:30", 1800.0)])
def test_time_limits_read_as_slurm_writes_them(text, seconds):
    assert parse_time_limit(text) == seconds
    assert load_config("demo", [f"run.time_limit={text}", "run.stop_margin_s=1"]).run.time_limit_s == seconds


@pytest.mark.parametrize("bad", ["90", "1:2:3:4", "soon", 0, -5, True])
def test_impossible_time_limits_are_refused_at_load(bad):
    with pytest.raises(UserError, match="run.time_limit"):
        load_config("demo", [f"run.time_limit={json.dumps(bad)}"])


def test_a_margin_as_long_as_the_limit_is_refused():
    with pytest.raises(UserError, match="stop_margin_s"):
        load_config("demo", ["run.time_limit=60"])  # the default margin is 60 s


def test_resume_auto_continues_only_a_run_of_uvq(tmp_path):
    assert resolve_resume("auto", tmp_path / "new") is False
    assert resolve_resume("auto", tmp_path) is False  # empty: a first start
    (tmp_path / ".uvq").write_text("")  # a marker of an older uvq: ours, entries unknown
    assert resolve_resume("auto", tmp_path) is True
    assert resolve_resume("last", tmp_path / "new") is True and resolve_resume(None, tmp_path) is False
    with pytest.raises(UserError, match="auto"):
        resolve_resume("yes", tmp_path)


def test_the_stop_request_keeps_room_for_a_step_and_a_write():
    now = [0.0]
    stop = StopRequest(clock=lambda: now[0])
    stop.set_time_limit(100.0, margin_s=10.0)  # deadline at 90 s
    stop.watch()
    now[0] = 20.0  # a 20 s step
    assert stop.should_stop() is None
    stop.note_write(15.0)
    now[0] = 50.0  # 50 + a 30 s step + a 15 s write passes 90
    assert stop.should_stop() == "time limit"
    stop.request(signal.SIGUSR1)
    assert stop.should_stop() == "SIGUSR1"


def test_bare_resume_keeps_its_meaning(chain, tmp_path):
    """`--resume` without a value, before or after other words, is the flag it always was."""
    from uvq.cli.app import normalise_resume

    assert normalise_resume(["fit-prior", "demo", "--resume", "a.b=1"]) == ["fit-prior", "demo", "--resume=last", "a.b=1"]
    assert normalise_resume(["fit-prior", "--resume"]) == ["fit-prior", "--resume=last"]
    assert normalise_resume(["fit-prior", "--resume", "auto"]) == ["fit-prior", "--resume", "auto"]
    out = tmp_path / "run"
    args = _args("fit-vqgan", chain, out)
    code, err = uvq_in_process(*args, "train.steps=4", cwd=REPO)
    assert code == 0, err
    code, err = uvq_in_process(*args, "--resume", "train.steps=6", cwd=REPO)
    assert code == 0, err
    assert _step_of(out) == 6



# ---------------------------------------------------------------------------------------------
# The SLURM job file as written (examples/slurm/, docs/cluster.md): stop, requeue, resume
# ---------------------------------------------------------------------------------------------


def test_the_slurm_job_file_requeues_until_the_run_is_done(chain, tmp_path):
    """examples/slurm/fit-prior-1node.sbatch run by bash with the real torchrun on the CPU.

    SLURM itself is not here: `srun` runs its command and `scontrol` records its arguments (the
    two SLURM programs the file calls). Each attempt stops at the time limit with a checkpoint;
    the file must requeue while the run is unfinished (torchrun's exit 1 hides uvq's 75, so the
    `.uvq.requeue` marker decides) and stop requeueing once it is done.
    """
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    torchrun = Path(sys.executable).parent / "torchrun"  # the one installed with torch beside this python
    log, run = tmp_path / "scontrol.log", tmp_path / "prior"
    job_env = {**env(), "PATH": f"{bin_dir}:{torchrun.parent}:{os.environ['PATH']}",
               "SCONTROL_LOG": str(log), "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "1", "TMPDIR": str(tmp_path),
               "RECIPE": "demo", "LATENTS": str(chain["latents"]), "RUN": str(run),
               "UVQ_ARGS": " ".join([*TINY, "prior_train.steps=3", "run.ckpt_every=1", "run.time_limit=1",
                                     "run.stop_margin_s=0", "run.stop_check_every=1", "--device", "cpu"])}
    job = REPO / "examples" / "slurm" / "fit-prior-1node.sbatch"
    requeues = 0
    for _attempt in range(6):
        done = subprocess.run(["bash", str(job)], env=job_env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        calls = log.read_text().splitlines() if log.exists() else []
        if len(calls) == requeues:  # not requeued: the run must be finished
            break
        requeues = len(calls)
        assert calls[-1] == "requeue 4242"
        assert (run / ".uvq.requeue").is_file()
    else:
        pytest.fail("the job file kept requeueing")
    assert requeues >= 1, "the time limit never stopped the run"
    assert not (run / ".uvq.requeue").exists()
    assert _step_of(run) == 3
