"""Signals at seeded moments of every long command, then a restart, compared with an uninterrupted run.

Promises checked (docs/reliability.md): SIGINT exits 130 and SIGTERM 143, never 0, with one
`error:` line; after any signal, SIGKILL included (also inside a checkpoint or shard write), the
restart finishes with exactly the weights, metrics, shards or images of a run that was never
interrupted, and leaves no `.tmp` behind.
"""

from __future__ import annotations

import random
import shutil
import signal

import pytest

from .harness import (
    REPO,
    SAMPLE,
    SEED,
    TINY,
    Moment,
    assert_interrupted_exit,
    assert_same_metrics,
    assert_same_weights,
    count_files,
    count_lines,
    interrupt,
    leftovers,
    png_bytes,
    shard_contents,
    uvq,
    uvq_in_process,
    weights_of,
)

COMMANDS = ("fit-vqgan", "fit-prior", "encode", "sample", "pipeline")
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
# The short seeded subset that runs in the default suite; the rest are `faults_full`.
DEFAULT = {("fit-vqgan", "SIGKILL", "write"), ("fit-vqgan", "SIGINT", "step")}


def _command(name: str, trained, out):
    """(first args, restart args, a progress count and its top, what to compare) for a command."""
    cpu = ["--device", "cpu"]
    if name == "fit-vqgan":
        args = ["fit-vqgan", "demo", *TINY, "--out", str(out), *cpu]
        return args, [*args, "--resume"], (count_lines(out / "metrics.jsonl"), 10), "run"
    if name == "fit-prior":
        args = ["fit-prior", "demo", *TINY, "--latents", str(trained["latents"]), "--out", str(out), *cpu]
        return args, [*args, "--resume"], (count_lines(out / "metrics.jsonl"), 10), "run"
    if name == "encode":
        args = ["encode", "--vqgan", str(trained["vqgan"]), "--out", str(out), "--recipe", "demo", *TINY,
                "data.demo_images=256", *cpu]
        return args, args, (count_files(out, "*.tar"), 8), "shards"  # encode resumes by running again
    if name == "sample":
        args = ["sample", "--prior", str(trained["prior"]), "--out", str(out), *SAMPLE, *cpu]
        return args, [*args, "--overwrite"], (count_files(out, "sample-*.png"), 40), "samples"
    args = ["pipeline", "demo", *TINY, "--out", str(out), *cpu]
    return args, args, (count_lines(out / "vqgan" / "metrics.jsonl"), 10), "pipeline"


def _cases():
    for name in COMMANDS:
        for sig in SIGNALS:
            for when in ("step", "write"):
                marks = [pytest.mark.fault("signals")]
                if (name, sig.name, when) not in DEFAULT:
                    marks.append(pytest.mark.faults_full)
                yield pytest.param(name, sig, when, marks=marks, id=f"{name}-{sig.name}-{when}")


@pytest.fixture(scope="session")
def uninterrupted(request, tmp_path_factory):
    """The result of each command run once without interruption (computed on first use)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"straight-{name}") / "out"
            args, _, _, _ = _command(name, _trained(request, name), out)
            code, err = uvq_in_process(*args, cwd=REPO)
            assert code == 0, f"the uninterrupted {name} failed:\n{err}"
            cache[name] = out
        return cache[name]
    return get


def _trained(request, name: str):
    """The session's tiny model pair, built only for the commands that start from it."""
    return request.getfixturevalue("trained") if name in ("fit-prior", "encode", "sample") else None


def _compare(kind: str, got, want) -> None:
    if kind == "run":
        assert_same_weights(weights_of(got), weights_of(want))
        assert_same_metrics(got, want)
    elif kind == "shards":
        assert shard_contents(got) == shard_contents(want), "the shards differ from an uninterrupted encode"
    elif kind == "samples":
        assert png_bytes(got) == png_bytes(want), "the samples differ from an uninterrupted run"
    else:
        for stage in ("vqgan", "prior"):
            assert_same_weights(weights_of(got / stage), weights_of(want / stage))
        assert png_bytes(got / "samples") == png_bytes(want / "samples")


@pytest.mark.parametrize(("name", "sig", "when"), list(_cases()))
def test_signal_then_restart_matches_an_uninterrupted_run(name, sig, when, request, uninterrupted, tmp_path):
    rng = random.Random(f"{SEED}-{name}-{sig.name}-{when}")
    out = tmp_path / "out"
    first, again, (progress, top), kind = _command(name, _trained(request, name), out)
    moment = Moment.draw(rng, when == "write", max_lines=top)
    # Inside a write: a checkpoint directory's for the trainers, a shard's or an image's otherwise.
    stages = [out / s for s in ("vqgan", "prior")] if name == "pipeline" else [out]
    watch = [d / "checkpoints" for d in stages] if name in ("fit-vqgan", "fit-prior", "pipeline") else [out]
    got = interrupt(first, sig, moment, cwd=REPO, progress=progress, watch=watch)
    assert got.reached, f"{name} ended (exit {got.code}) before the moment ({moment.describe()}):\n{got.stderr[-1500:]}"
    if sig == signal.SIGKILL:
        assert got.code == -signal.SIGKILL
    else:
        assert_interrupted_exit(sig, got.code, got.stderr)

    done = uvq(*again, cwd=REPO)
    assert done.returncode == 0, f"the restart after {sig.name} {moment.describe()} failed:\n{done.stderr[-2000:]}"
    _compare(kind, out, uninterrupted(name))
    assert not leftovers(out), f"temporary files left after the restart: {leftovers(out)}"
    shutil.rmtree(out, ignore_errors=True)
