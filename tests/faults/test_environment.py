"""The machine misbehaves: a full disk, and two writers on one directory.

Promises checked (docs/reliability.md): a full disk is a user error (exit 2, one line naming the
path), never an internal error; one writer per directory (a second training, encode or sample
into a directory in use is refused with exit 2, and the first finishes intact).
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from .harness import REPO, SAMPLE, TINY, assert_one_line_refusal, env, uvq

CPU = ["--device", "cpu"]
pytestmark = pytest.mark.faults_full


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root; skipped otherwise), unmounted afterwards."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (root needed): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.fault("disk")
@pytest.mark.parametrize("command", ["fit-vqgan", "encode", "sample"])
def test_full_disk_is_one_line_naming_the_path(command, small_disk, request):
    out = small_disk / "out"
    if command == "fit-vqgan":
        args = ["fit-vqgan", "demo", *TINY, "--out", str(out), *CPU]
    else:
        trained = request.getfixturevalue("trained")
        if command == "encode":
            args = ["encode", "--vqgan", str(trained["vqgan"]), "--out", str(out), "--recipe", "demo", *TINY,
                    "data.demo_images=2048", *CPU]
        else:
            args = ["sample", "--prior", str(trained["prior"]), "--out", str(out), *SAMPLE, "-n", "2000", *CPU]
    done = uvq(*args, cwd=REPO)
    assert_one_line_refusal(done.returncode, done.stderr)
    assert str(small_disk) in done.stderr, f"the message does not name the full path: {done.stderr[-500:]}"


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "uvq", *args], cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.fault("concurrency")
@pytest.mark.parametrize("command", ["fit-vqgan-resume", "encode", "sample"])
def test_second_writer_on_one_directory_is_refused(command, copy_of_trained, request, tmp_path):
    if command == "fit-vqgan-resume":
        run = copy_of_trained("vqgan")
        args = ["fit-vqgan", "demo", *TINY, "train.steps=40", "--out", str(run), "--resume", *CPU]
    else:
        trained = request.getfixturevalue("trained")
        out = tmp_path / "out"
        if command == "encode":
            args = ["encode", "--vqgan", str(trained["vqgan"]), "--out", str(out), "--recipe", "demo", *TINY,
                    "data.demo_images=512", *CPU]
        else:
            args = ["sample", "--prior", str(trained["prior"]), "--out", str(out), *SAMPLE, *CPU]
    procs = [_start(args), _start(args)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], f"two writers on one directory: exits {codes}:\n" + "\n---\n".join(
        err[-800:] for _, err in results)
    assert_one_line_refusal(*next(r for r in results if r[0] == 2))
