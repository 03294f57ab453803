"""Atomic writes, output-directory ownership, the one-writer lock, leftovers and disk errors (uvq.files)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from uvq.files import (
    LOCK,
    MARKER,
    DirLock,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    check_out_dir,
    claim_out_dir,
    read_record,
    replace_symlink,
)
from uvq.runtime import UserError


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_dir_replaces_whole(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyboardInterrupt), atomic_dir(d) as tmp:
        (tmp / "b").write_text("2")
        raise KeyboardInterrupt
    assert sorted(p.name for p in d.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_json_and_hash(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    data = (tmp_path / "x.json").read_bytes()
    assert json.loads(data) == {"a": 1}


def test_symlink_swap(tmp_path):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()
    replace_symlink(tmp_path / "last", "s1")
    replace_symlink(tmp_path / "last", "s2")
    assert (tmp_path / "last").resolve().name == "s2"


# ---------------------------------------------------------------------------------------------
# Ownership (issue 11 finding 3; issue 10 item 2)
# ---------------------------------------------------------------------------------------------


def _claim(path, **kw):
    claim = claim_out_dir(path, **{"command": "sample", **kw})
    claim.release()
    return claim


def test_out_dir_new_empty_resume_and_refuse(tmp_path):
    assert check_out_dir(tmp_path / "new", command="sample").action == "new"
    assert not (tmp_path / "new").exists()  # the check writes nothing
    out = _claim(tmp_path / "new", entries=["result.txt"]).path
    record = read_record(out)
    assert record["command"] == "sample" and record["entries"] == ["result.txt"]
    assert check_out_dir(out, command="sample").action == "empty"  # nothing written yet
    (out / "result.txt").write_text("ours")
    with pytest.raises(UserError, match="not empty; pass --overwrite to replace it"):
        check_out_dir(out, command="sample")  # sample has nothing to resume
    with pytest.raises(UserError, match="made by `uvq sample`"):
        check_out_dir(out, command="fit-vqgan")
    assert check_out_dir(out, command="sample", resume=True).action == "resume"
    with pytest.raises(UserError, match="made by `uvq sample`"):
        check_out_dir(out, command="fit-vqgan", resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        check_out_dir(tmp_path / "file", command="sample")


def test_overwrite_refuses_a_directory_uvq_does_not_own(tmp_path):
    """A user's thesis.tex and sub/ survive --overwrite (before: both deleted)."""
    foreign = tmp_path / "thesis"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "thesis.tex").write_text("chapter 1")
    (foreign / "sub" / "fig.pdf").write_text("figure")
    for kw in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(UserError, match="not made by uvq"):
            claim_out_dir(foreign, command="sample", **kw)
    assert sorted(p.name for p in foreign.iterdir()) == ["sub", "thesis.tex"]
    assert (foreign / "sub" / "fig.pdf").read_text() == "figure"


def test_overwrite_removes_only_recorded_entries_and_follows_no_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    out = _claim(tmp_path / "out", entries=["grid.png", "codes", "link", "checkpoints"],
                 patterns=["sample-*.png"]).path
    (out / "grid.png").write_bytes(b"g")
    (out / "sample-000000.png").write_bytes(b"s")
    (out / "codes").mkdir()
    (out / "codes" / "x").write_text("c")
    (out / "link").symlink_to(outside)  # a recorded entry that is a link: unlinked, never entered
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "inner").symlink_to(outside)  # a link inside a recorded directory
    (out / "notes.txt").write_text("the user's")  # not in the record
    plan = check_out_dir(out, command="fit-vqgan", overwrite=True)
    assert plan.action == "overwrite" and plan.foreign == ("notes.txt",)
    _claim(out, command="fit-vqgan", overwrite=True, entries=["config.yaml"])
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "notes.txt"]
    assert (outside / "precious.txt").read_text() == "keep"
    assert read_record(out)["command"] == "fit-vqgan" and read_record(out)["entries"] == ["config.yaml"]


def test_overwrite_refuses_the_commands_own_inputs(tmp_path):
    """--out equal to, holding, or inside an input is refused (before: the input was deleted)."""
    run = _claim(tmp_path / "prior", entries=["checkpoints"]).path
    ckpt = run / "checkpoints" / "step-1"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    for out in (ckpt, run, run / "checkpoints" / "step-1" / "samples"):
        with pytest.raises(UserError, match="overlaps this command's own input"):
            check_out_dir(out, command="sample", overwrite=True, inputs=[ckpt])
    (tmp_path / "link").symlink_to(run)  # through a symlink too
    with pytest.raises(UserError, match="overlaps"):
        check_out_dir(tmp_path / "link", command="sample", overwrite=True, inputs=[ckpt])
    # shard patterns count as their folder; URLs, pipe: and demo are not paths
    with pytest.raises(UserError, match="overlaps"):
        check_out_dir(run, command="fit-vqgan", overwrite=True, inputs=[f"{run}/train-{{000..009}}.tar"])
    check_out_dir(tmp_path / "elsewhere", command="sample", inputs=["demo", "pipe:cat x.tar", "https://h/x.tar", ckpt])
    assert (ckpt / "meta.json").exists()


def test_marker_of_an_older_uvq_resumes_but_is_not_overwritten(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / MARKER).touch()
    (old / "config.yaml").write_text("x")
    assert check_out_dir(old, command="fit-vqgan", resume=True).action == "resume"
    with pytest.raises(UserError, match="older uvq"):
        claim_out_dir(old, command="fit-vqgan", overwrite=True)
    assert (old / "config.yaml").exists()
    (old / MARKER).write_text("not json")
    with pytest.raises(UserError, match="damaged"):
        check_out_dir(old, command="fit-vqgan", resume=True)


# ---------------------------------------------------------------------------------------------
# One writer per directory (issue 11 finding 8)
# ---------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    first = claim_out_dir(tmp_path / "d", command="fit-vqgan")
    holder = json.loads((tmp_path / "d" / LOCK).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(UserError, match=f"in use by `uvq fit-vqgan` \\(pid {os.getpid()} on "):
        claim_out_dir(tmp_path / "d", command="fit-vqgan", resume=True)
    # another process is refused as well
    code = ("import sys; from uvq.files import claim_out_dir; from uvq.runtime import UserError\n"
            f"try: claim_out_dir({str(tmp_path / 'd')!r}, command='fit-vqgan', resume=True)\n"
            "except UserError as e: print(e); sys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"pid {os.getpid()}" in proc.stdout
    first.release()
    assert not (tmp_path / "d" / LOCK).exists()
    _claim(tmp_path / "d", command="fit-vqgan", resume=True)


def test_a_stale_lock_is_taken_over(tmp_path):
    d = _claim(tmp_path / "d").path
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs on this host
    (d / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "time": "then",
                                      "command": "sample", "token": "old"}))
    claim = claim_out_dir(d, command="sample", resume=True)
    assert json.loads((d / LOCK).read_text())["pid"] == os.getpid()
    claim.release()
    # a lock of another host cannot be judged from here: refused, naming it
    (d / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": "then", "command": "sample"}))
    with pytest.raises(UserError, match="pid 1 on elsewhere"):
        claim_out_dir(d, command="sample", resume=True)


def test_the_lock_is_released_when_a_command_fails(tmp_path):
    def failing_command():
        claim = claim_out_dir(tmp_path / "d", command="sample")  # noqa: F841 (held until the frame dies)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        failing_command()
    gc.collect()
    assert not (tmp_path / "d" / LOCK).exists()
    # and a lock left by this very process with no live holder is stale, not "in use"
    lock = DirLock(tmp_path / "d", "sample").acquire()
    token = lock.token
    lock._finalizer.detach()  # simulate a holder that vanished without releasing
    del lock
    gc.collect()
    assert json.loads((tmp_path / "d" / LOCK).read_text())["token"] == token
    _claim(tmp_path / "d", resume=True)
    # and at exit (a process that is interrupted releases its lock)
    code = ("from uvq.files import claim_out_dir\n"
            f"c = claim_out_dir({str(tmp_path / 'e')!r}, command='sample')\nraise KeyboardInterrupt\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and (tmp_path / "e" / MARKER).exists() and not (tmp_path / "e" / LOCK).exists()


# ---------------------------------------------------------------------------------------------
# Leftovers of killed atomic writes (issue 11 finding 6, last sentence)
# ---------------------------------------------------------------------------------------------


def test_leftover_temporaries_are_removed_at_the_next_start(tmp_path):
    d = _claim(tmp_path / "run", command="fit-vqgan", entries=["checkpoints"], patterns=["latents-*.tar"]).path
    (d / "checkpoints" / ".step-00000010.k3j2.tmp").mkdir(parents=True)
    (d / "checkpoints" / ".step-00000010.k3j2.tmp" / "model.safetensors").write_bytes(b"x" * 1000)
    (d / "latents-000001.tar.tmp").write_bytes(b"half a shard")
    (d / ".config.yaml.abcd.tmp").write_text("half")
    (d / "checkpoints" / ".last.123.lnk").symlink_to("nowhere")
    (d / "notes.tmp").write_text("a user's file that merely ends in .tmp")
    (d / "checkpoints" / "step-00000005").mkdir()
    _claim(d, command="fit-vqgan", resume=True)
    assert sorted(p.name for p in d.iterdir()) == [MARKER, "checkpoints", "notes.tmp"]
    assert [p.name for p in (d / "checkpoints").iterdir()] == ["step-00000005"]
    # a directory uvq does not own is never cleaned (nor written)
    other = tmp_path / "other"
    other.mkdir()
    (other / ".x.tmp").write_text("y")
    with pytest.raises(UserError):
        claim_out_dir(other, command="fit-vqgan", resume=True)
    assert (other / ".x.tmp").exists()


# ---------------------------------------------------------------------------------------------
# Disk errors (issue 11 findings 11, 13)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 2 MiB tmpfs (root only; skipped where it cannot be mounted), unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_a_user_error_naming_the_path(small_tmpfs):
    out = _claim(small_tmpfs / "out", entries=["big.bin"]).path
    with pytest.raises(UserError, match=r"cannot write .*big\.bin: no space left on its device \(ENOSPC\)"):
        atomic_write_bytes(out / "big.bin", b"\0" * (3 << 20))
    assert not (out / "big.bin").exists() and not list(out.glob(".*.tmp"))  # nothing half-written left
    # a safetensors weight file through atomic_dir (safetensors wraps the OS error in its own)
    import torch

    from uvq.checkpoint import write_checkpoint_dir

    with pytest.raises(UserError, match="no space left"):
        write_checkpoint_dir(out / "ckpt", kind="vqgan", model_config={},
                             weights={"model": {"w": torch.zeros(1 << 20)}})
    with contextlib.suppress(OSError):  # fill the disk to the last block
        for i in range(4000):
            (small_tmpfs / f"fill{i}").write_bytes(b"\0" * 4096)
    with pytest.raises(UserError, match="no space left"):  # a command's claim on a full disk
        claim_out_dir(small_tmpfs / "next", command="sample")


def test_read_only_and_impossible_places_are_user_errors(small_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(UserError, match=r"cannot create .*out: the file system is read-only \(EROFS\)"):
        claim_out_dir(small_tmpfs / "out", command="sample")


def test_out_under_proc_is_a_user_error():
    with pytest.raises(UserError, match="/proc/x"):
        claim_out_dir("/proc/x", command="sample")


# ---------------------------------------------------------------------------------------------
# Modes (issue 11 finding 13)
# ---------------------------------------------------------------------------------------------


def test_outputs_and_weight_files_follow_the_umask(tmp_path):
    import torch

    from uvq.checkpoint import write_checkpoint_dir

    umask = os.umask(0)
    os.umask(umask)
    atomic_write_json(tmp_path / "x.json", {})
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~umask
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("1")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
    ckpt = write_checkpoint_dir(tmp_path / "ck", kind="vqgan", model_config={}, weights={"model": torch.nn.Linear(2, 2)})
    for f in ckpt.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name  # safetensors alone makes 0600


def test_a_killed_lockers_temporary_file_is_removed_at_the_next_claim(tmp_path):
    """SIGKILL between writing the lock's temporary file and linking it leaves `.uvq.lock.PID.N.tmp`;
    the next claim removes it when that pid is dead on this host, and keeps a live locker's."""
    import socket as _socket

    from uvq.files import claim_out_dir

    out = tmp_path / "out"
    claim_out_dir(out, command="sample").release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = out / f".uvq.lock.{dead.pid}.1234.tmp"
    left.write_text(json.dumps({"host": _socket.gethostname(), "pid": dead.pid}) + "\n")
    torn = out / f".uvq.lock.{dead.pid}.99.tmp"
    torn.write_text('{"host": "')
    live = out / f".uvq.lock.{os.getpid()}.5678.tmp"
    live.write_text(json.dumps({"host": _socket.gethostname(), "pid": os.getpid()}) + "\n")
    claim_out_dir(out, command="sample", resume=True).release()
    assert not left.exists() and not torn.exists()
    assert live.exists()
