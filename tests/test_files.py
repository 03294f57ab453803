"""Atomic writes and output-directory ownership."""

from __future__ import annotations

import json

import pytest

from uvq.files import (
    MARKER,
    atomic_dir,
    atomic_path,
    atomic_write_json,
    prepare_out_dir,
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


def test_out_dir_rules(tmp_path):
    out = prepare_out_dir(tmp_path / "new")
    assert (out / MARKER).exists()
    (out / "result.txt").write_text("ours")
    with pytest.raises(UserError, match="--resume .* or --overwrite"):
        prepare_out_dir(out, resume=False)
    with pytest.raises(UserError, match="not empty; pass --overwrite to replace its contents$"):
        prepare_out_dir(out)  # a command that cannot resume is not told to pass --resume
    assert prepare_out_dir(out, resume=True) == out
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("not ours")
    with pytest.raises(UserError, match="pass --overwrite"):
        prepare_out_dir(foreign, resume=True)
    assert (foreign / "precious.txt").exists()
    prepare_out_dir(foreign, overwrite=True)
    assert not (foreign / "precious.txt").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        prepare_out_dir(tmp_path / "file")


def test_outputs_get_the_usual_permissions(tmp_path):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    atomic_write_json(tmp_path / "x.json", {})
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~umask
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("1")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
