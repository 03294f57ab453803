"""Bytes on disk: atomic writes, content hashes, and output directories we may write into.

Everything uvq writes goes to a temporary name in the same directory and is renamed into place,
so a killed process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from uvq.runtime import UserError

MARKER = ".uvq"  # present in every directory uvq created; other directories are not ours
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give outputs the usual mode
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory beside `path`; on success it replaces `path` by rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 directories
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_symlink(link: str | Path, target: str) -> None:
    """Point `link` at `target` (relative) atomically."""
    link = Path(link)
    tmp = link.parent / f".{link.name}.{os.getpid()}.lnk"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare_out_dir(path: str | Path, *, overwrite: bool = False, resume: bool | None = None,
                    what: str = "output") -> Path:
    """Make `path` ready to receive a command's output.

    A new or empty directory is taken and marked as ours. A non-empty directory is accepted only
    when `resume` is set and it is ours, or when `overwrite` is set (then its contents are
    removed). Anything else is a UserError that names the fix (`--resume` only for a caller that
    can resume, i.e. passes `resume` at all).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} path {path} exists and is not a directory; choose another --out")
    contents = [p for p in path.iterdir() if p.name != MARKER] if path.exists() else []
    if contents:
        ours = (path / MARKER).exists()
        if resume and ours:
            return path
        if not overwrite:
            hint = ("pass --resume to continue it or --overwrite to replace it" if ours and resume is not None
                    else "pass --overwrite to replace its contents")
            raise UserError(f"{what} directory {path} is not empty; {hint}")
        for p in contents:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()
    return path
