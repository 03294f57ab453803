"""The fault-injection harness: tiny settings, running `uvq` as a user would, signals at seeded moments.

Every long command runs in a real subprocess (`python -m uvq ...`), so that a signal reaches a
real process with real file writes in flight. `interrupt` starts a command, waits for a seeded
moment (after a number of logged steps, or the instant a temporary `.tmp` file of an atomic
write appears), sends the signal, and returns what the process left behind. The comparisons
below then read the outputs as plain files (safetensors, shards, PNG bytes), independently of
uvq's own loaders.

The idea of killing at random points and checking that a restart converges to the state of an
uninterrupted run follows crash-consistency testing (e.g. ALICE, Pillai et al., OSDI 2014).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("UVQ_FAULTS_SEED", "0"))  # the seed of every random moment and choice

# A tiny twin of the demo recipe: 16x16 images, 8x8 codes from 16 entries, a 1-layer prior.
TINY = [
    "model.vqgan.img_size=16", "model.vqgan.ch_mult=[1,2]", "model.vqgan.attn_resolutions=[8]",
    "model.vqgan.emb_dim=8", "model.vqgan.codebook_size=16", "model.discriminator.ndf=8",
    "model.discriminator.n_layers=1", "model.prior.codebook_size=16", "model.prior.latent_shape=[8,8]",
    "model.prior.n_embd=32", "model.prior.n_head=2", "model.prior.n_layer=1",
    "data.demo_images=64", "train.batch_size=2", "train.disc_start_step=2", "train.ema_every=2",
    "train.lr=0.001", "train.steps=16", "run.log_every=1", "run.image_every=1000", "run.ckpt_every=4",
    "run.keep_last=2", "prior_train.steps=16", "prior_train.batch_size=8", "prior_train.val_every=8",
    "prior_train.val_batches=1", "prior_train.warmup_steps=1", "encode.batch_size=8", "encode.shard_size=16",
    "sample.n=16", "sample.steps=8", "sample.batch_size=4",
]
CODEBOOK = 16  # K of TINY
SAMPLE = ["-n", "64", "--steps", "8", "--batch-size", "4", "--seed", "0"]

EXIT_ON = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, the shell's convention
EXIT_REQUEUE = 75  # a loop that got the signal saved its state first (docs/reliability.md)


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _limit_memory(gib: float):
    def apply() -> None:  # runs in the child before exec: a bomb dies of MemoryError, not the machine
        cap = int(gib * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return apply


def uvq(*args: str, cwd: Path | str, timeout: float = 300, memory_gib: float | None = 10) -> subprocess.CompletedProcess:
    """`python -m uvq ARGS` in a subprocess, under a memory cap, with its output captured."""
    return subprocess.run([sys.executable, "-m", "uvq", *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_limit_memory(memory_gib) if memory_gib else None)


def uvq_in_process(*args: str, cwd: Path | str) -> tuple[int, str]:
    """`uvq ARGS` through the real entry point `uvq.cli.app.main` in this process: (exit code, stderr)."""
    from uvq.cli.app import main

    err, here = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main(list(args))
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(here)
    return code, err.getvalue()


# ---------------------------------------------------------------------------------------------
# Promises every refusal and every interruption must keep
# ---------------------------------------------------------------------------------------------


def assert_one_line_refusal(code: int, stderr: str) -> None:
    """Exit 2 and one line `error: ...`, no traceback (issue 11: hostile inputs are user errors)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert code == 2, f"exit {code}, expected 2; stderr:\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-2000:]
    assert lines and lines[-1].startswith("error: ") and "internal error" not in lines[-1], stderr[-2000:]
    assert sum(ln.startswith("error: ") for ln in lines) == 1, stderr[-2000:]


def assert_interrupted_exit(sig: int, code: int, stderr: str) -> None:
    """SIGINT exits 130, SIGTERM 143, or 75 where a loop stopped with its state saved (never 0),
    with one `error:` line and no traceback."""
    assert code != 0, f"interrupted by {signal.Signals(sig).name} but exited 0"
    assert code in (EXIT_ON[sig], EXIT_REQUEUE), \
        f"{signal.Signals(sig).name}: exit {code}, expected {EXIT_ON[sig]} or {EXIT_REQUEUE}; stderr:\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-2000:]
    assert any(ln.startswith("error: ") for ln in stderr.splitlines()), stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Signals at seeded moments
# ---------------------------------------------------------------------------------------------


@dataclass
class Moment:
    """When to send the signal: once the command's progress count reaches `lines` (plus a short seeded delay), or, when
    `in_write`, the first instant a `.tmp` file or directory of an atomic write exists under `watch`."""

    in_write: bool
    lines: int = 0
    delay: float = 0.0

    @classmethod
    def draw(cls, rng: random.Random, in_write: bool, max_lines: int) -> Moment:
        return cls(in_write, rng.randint(2, max_lines), rng.uniform(0.0, 0.05))

    def describe(self) -> str:
        return "inside an atomic write" if self.in_write else f"at progress {self.lines} + {self.delay:.3f} s"


def _tmp_in(dirs: list[Path]) -> bool:
    for d in dirs:
        with contextlib.suppress(OSError):
            if any(e.name.endswith(".tmp") for e in os.scandir(d)):
                return True
    return False


def count_lines(path: Path):
    """Progress as the number of records in a JSON-lines file."""
    def count() -> int:
        try:
            return path.read_bytes().count(b"\n")
        except OSError:
            return 0
    return count


def count_files(root: Path, pattern: str):
    """Progress as the number of finished files matching `pattern` in `root`."""
    return lambda: len(list(root.glob(pattern))) if root.is_dir() else 0


@dataclass
class Interrupted:
    code: int
    stderr: str
    reached: bool  # the moment came, and the signal was sent, while the process still ran


def interrupt(args: list[str], sig: int, moment: Moment, *, cwd: Path, progress, watch: list[Path],
              timeout: float = 240) -> Interrupted:
    """Run `uvq ARGS`, send `sig` at `moment`, and wait for the process to end."""
    proc = subprocess.Popen([sys.executable, "-m", "uvq", *args], cwd=cwd, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    reached = False
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if moment.in_write:
                if _tmp_in(watch):
                    reached = True
                    break
                time.sleep(0.0005)
            else:
                if progress() >= moment.lines:
                    time.sleep(moment.delay)
                    reached = True
                    break
                time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(sig)
        else:
            reached = False
    finally:
        try:
            _, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # ignored the signal: that is a failure the test reports
            proc.kill()
            _, stderr = proc.communicate()
            stderr += "\n(harness: the process ignored the signal for 120 s and was killed)"
    return Interrupted(proc.returncode, stderr, reached)


# ---------------------------------------------------------------------------------------------
# Reading results as plain files
# ---------------------------------------------------------------------------------------------


def last_checkpoint(run: Path) -> Path:
    link = run / "checkpoints" / "last"
    assert link.exists(), f"no checkpoints/last in {run}"
    return link.resolve()


def weights_of(run: Path) -> dict[str, dict]:
    """Every weight file of the run's last checkpoint, as {file: {name: tensor}}."""
    ckpt = last_checkpoint(run)
    return {f.name: load_file(str(f)) for f in sorted(ckpt.glob("*.safetensors"))}


def assert_same_weights(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for file in a:
        assert sorted(a[file]) == sorted(b[file]), file
        bad = [k for k in a[file] if not (a[file][k].dtype == b[file][k].dtype and a[file][k].shape == b[file][k].shape
                                          and bool((a[file][k] == b[file][k]).all()))]
        assert not bad, f"{file}: tensors differ from the uninterrupted run: {bad[:5]}"


TIMING = ("per_s", "seconds", "time", "elapsed", "eta")


def metrics_rows(run: Path) -> list[dict]:
    """metrics.jsonl without wall-clock fields, one dict per line."""
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def assert_same_metrics(a: Path, b: Path) -> None:
    ra, rb = metrics_rows(a), metrics_rows(b)
    steps = [r.get("step") for r in ra]
    assert len(steps) == len(set(steps)) or None in steps, f"metrics.jsonl holds a step twice: {steps}"
    assert ra == rb, "metrics.jsonl differs from the uninterrupted run"


def shard_contents(latents: Path) -> dict[str, dict[str, bytes]]:
    """{shard file: {member: bytes}} of the finished shards, read with tarfile (no uvq code)."""
    out = {}
    for p in sorted(latents.glob("*.tar")):
        with tarfile.open(p) as tar:
            out[p.name] = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    return out


def png_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("sample-*.png"))}


def leftovers(root: Path) -> list[str]:
    """Temporary files or directories of atomic writes still present after a finished command."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.tmp"))
