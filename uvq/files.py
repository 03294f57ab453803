"""Bytes on disk: atomic writes, content hashes, and the output directories uvq may write into.

Everything uvq writes goes to a temporary name in the same directory and is renamed into place,
so a killed process never leaves a half-written file under the final name. Leftover temporary
names (TEMP_NAME) are removed the next time a command claims the directory.

Output directories (docs/reliability.md):
- ownership: a directory is uvq's when it holds a `.uvq` record (JSON: the command that made it
  and the entries it wrote). `check_out_dir` decides, without writing, whether a command may use
  a directory: new, empty, ours to resume, ours to overwrite, or refused. Every command and every
  dry run calls it; `claim_out_dir` repeats the check under the lock and then writes.
  `--overwrite` removes only the entries in the record, never follows a symlink, and is refused
  for a directory that holds, equals, contains or lies inside one of the command's inputs.
- one writer: `DirLock`, a `.uvq.lock` file naming the holder's host and pid; a lock whose holder
  died on this host is taken over.
- disk errors: a full disk, a quota, a permission or a read-only file system is a UserError that
  names the path.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uvq.runtime import UserError

MARKER = ".uvq"  # the ownership record of every directory uvq made; directories without one are not ours
LOCK = ".uvq.lock"  # held while a command writes into the directory (one writer per directory)
REQUEUE = ".uvq.requeue"  # left by a command that stopped early with its state saved (docs/cluster.md)
RECORD_FORMAT = "uvq-output-dir"
_RESUMABLE = ("fit-vqgan", "fit-prior")  # the commands with a --resume flag (encode and pipeline always continue)
# Temporary names of uvq's atomic writes: `.<name>.<random>.tmp` (atomic_path, atomic_dir, the
# checkpoint directories' `.step-*.tmp`), `<shard>.tar.tmp` (uvq.prior.latents.ShardWriter) and
# `.<link>.<pid>.lnk` (replace_symlink). Nothing else is ever removed as a leftover.
TEMP_NAME = re.compile(r"^\..+\.tmp$|^.+\.tar\.tmp$|^\..+\.\d+\.lnk$")
_UMASK = os.umask(0)
os.umask(_UMASK)

# errno -> what to tell the user; these are about the place, not about uvq
_DISK_ERRORS = {
    errno.ENOSPC: "no space left on its device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
    errno.EROFS: "the file system is read-only",
}


def disk_error(exc: BaseException, path: str | Path, doing: str = "write") -> UserError:
    """The one-line UserError for an error met while writing `path` (the fix depends on the place)."""
    code = _disk_errno(exc, path)
    if code is not None:
        why = f"{_DISK_ERRORS[code]} ({errno.errorcode[code]})"
    else:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return UserError(f"cannot {doing} {path}: {why}; free space, fix the permissions, or choose another --out")


def _disk_errno(exc: BaseException, path: str | Path) -> int | None:
    """The errno of a disk error, also when a library wrapped it (safetensors' and torch's writers
    raise their own exceptions, which carry the C library's message or only "write failed")."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in _DISK_ERRORS else None
    text = str(exc)
    for code in _DISK_ERRORS:
        if os.strerror(code) in text:
            return code
    if "write failed" in text:  # torch.save's PytorchStreamWriter names no cause: look at the device
        with contextlib.suppress(OSError):
            if shutil.disk_usage(Path(path).parent).free < 1 << 20:
                return errno.ENOSPC
    return None


def _is_disk_error(exc: BaseException, path: str | Path) -> bool:
    return not isinstance(exc, UserError) and _disk_errno(exc, path) is not None


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise disk_error(exc, path) from exc
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give outputs the usual mode
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _is_disk_error(exc, path):
            raise disk_error(exc, path) from exc
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise disk_error(exc, path) from exc
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 directories
        for f in tmp.iterdir():  # and e.g. safetensors makes 0600 files: outputs follow the umask
            if f.is_file() and not f.is_symlink():
                os.chmod(f, 0o666 & ~_UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_error(exc, path):
            raise disk_error(exc, path) from exc
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




# ---------------------------------------------------------------------------------------------
# Output directories: the ownership record, the check, the claim
# ---------------------------------------------------------------------------------------------


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The `.uvq` record of directory `path`, or None when it has none (not ours).

    A marker written by uvq before records existed is empty: it is ours, with unknown entries.
    """
    f = Path(path) / MARKER
    if not f.is_file() or f.is_symlink():
        return None
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the ownership record {f}: {exc}") from exc
    if not text.strip():
        return {"format": RECORD_FORMAT, "command": None, "entries": None, "patterns": []}
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = None
    if not (isinstance(record, dict) and record.get("format") == RECORD_FORMAT
            and isinstance(record.get("entries"), list) and isinstance(record.get("patterns", []), list)):
        raise UserError(f"the ownership record {f} is damaged; uvq will not guess what it wrote there: "
                        "choose another --out or clean the directory yourself")
    return record


def _write_record(path: Path, record: dict[str, Any]) -> None:
    atomic_write_json(path / MARKER, record)


def _local_paths(inputs: Iterable[str | Path | None]) -> list[Path]:
    """The inputs that are local paths (not URLs, `pipe:` commands or `demo`); brace patterns of
    shard names count as their folder."""
    out = []
    for item in inputs:
        if item is None:
            continue
        s = str(item)
        if s.startswith("pipe:") or "://" in s:
            continue
        p = Path(s.split("{", 1)[0]).parent if "{" in s else Path(s)
        if p.exists() or p.is_symlink():
            out.append(p)
    return out


def _overlap(out: Path, inputs: Sequence[Path]) -> Path | None:
    """The first input that `out` equals, contains or lies inside (symlinks resolved)."""
    o = out.resolve()
    for p in inputs:
        for q in {p.absolute(), p.resolve()}:
            if o == q or o in q.parents or q in o.parents:
                return p
    return None


@dataclass(frozen=True)
class OutDirPlan:
    """What `check_out_dir` decided: action is "new", "empty", "resume" or "overwrite"; `foreign`
    names the entries of an owned directory that its record does not list (kept by --overwrite)."""

    path: Path
    command: str
    action: str
    record: dict[str, Any] | None
    foreign: tuple[str, ...] = ()


def check_out_dir(path: str | Path, *, command: str, overwrite: bool = False, resume: bool = False,
                  inputs: Iterable[str | Path | None] = ()) -> OutDirPlan:
    """Decide whether `uvq <command>` may write into `path`; writes nothing (dry runs call this).

    - a missing or empty directory is taken (new / empty);
    - a non-empty one must be ours (a `.uvq` record): `resume` continues it when the record's
      command is this one; `overwrite` removes the record's entries at the claim;
    - everything else is refused, and so is any `path` that equals, contains or lies inside one
      of the command's `inputs` (local paths; URLs and `pipe:` sources are skipped).
    """
    path = Path(path)
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other; pass one")
    if path.is_symlink() and not path.exists():
        raise UserError(f"output path {path} is a dangling symlink; choose another --out")
    if path.exists() and not path.is_dir():
        raise UserError(f"output path {path} exists and is not a directory; choose another --out")
    clash = _overlap(path, _local_paths(inputs))
    if clash is not None:
        raise UserError(f"--out {path} overlaps this command's own input {clash}; choose an --out outside its inputs")
    try:
        contents = [p.name for p in path.iterdir() if not _is_bookkeeping(p.name)] if path.exists() else []
    except OSError as exc:
        raise disk_error(exc, path, "read") from exc
    record = read_record(path) if path.exists() else None
    if not contents:
        return OutDirPlan(path, command, "empty" if path.exists() else "new", record)
    if record is None:
        raise UserError(f"output directory {path} is not empty and was not made by uvq (no {MARKER} record); "
                        "uvq will not write into it or delete its files: choose another --out")
    made_by = record.get("command")
    foreign = tuple(sorted(set(contents) - set(_recorded(record, contents)))) if record.get("entries") is not None else ()
    if resume:
        if made_by is not None and made_by != command:
            raise UserError(f"cannot resume {path} with `uvq {command}`: it was made by `uvq {made_by}`; "
                            "choose another --out")
        return OutDirPlan(path, command, "resume", record, foreign)
    if overwrite:
        if record.get("entries") is None:
            raise UserError(f"{path} was made by an older uvq that kept no list of its files, so --overwrite "
                            "cannot tell them from yours; delete it yourself or choose another --out")
        return OutDirPlan(path, command, "overwrite", record, foreign)
    hint = ("pass --resume to continue it or --overwrite to replace it"
            if command in _RESUMABLE and made_by in (None, command) else "pass --overwrite to replace it")
    raise UserError(f"output directory {path} is not empty; {hint} (it was made by `uvq {made_by or 'an older version'}`)")


def _is_bookkeeping(name: str) -> bool:
    """The record, the lock and their temporaries (`.uvq*`): not contents of the directory, so that
    a second command starting at the same moment meets the lock, not a "foreign" directory."""
    return name.lstrip(".") == MARKER[1:] or name.lstrip(".").startswith(f"{MARKER[1:]}.")


def _remove_entry(p: Path) -> None:
    """Remove one recorded entry without following symlinks (a link is unlinked, never entered)."""
    if p.is_symlink() or not p.is_dir():
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    else:
        shutil.rmtree(p)  # rmtree unlinks the symlinks inside and never follows them


def _recorded(record: dict[str, Any], names: Iterable[str]) -> list[str]:
    entries, patterns = set(record.get("entries") or []), record.get("patterns") or []
    return [n for n in names if n in entries or any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]


_LOCK_TEMP = re.compile(r"^\.uvq\.lock\.(\d+)\.\d+\.tmp$")


def _dead_lock_temp(p: Path) -> bool:
    """A lock's temporary file left by a locker that was killed before linking it: its pid is dead
    on this host (read from the file; a file cut short by the kill counts by the pid in its name)."""
    m = _LOCK_TEMP.match(p.name)
    if m is None or p.is_symlink():
        return False
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        info = None
    if isinstance(info, dict):
        return info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1)))
    return not _pid_alive(int(m.group(1)))


def remove_leftover_temps(path: str | Path) -> list[Path]:
    """Remove the temporary names of killed atomic writes (TEMP_NAME only) in `path` and, at any
    depth, in its recorded subdirectories, never following symlinks. Call it holding the lock
    (another locker's `.uvq.lock.*.tmp` is left alone)."""
    path = Path(path)
    record = read_record(path)
    if record is None:
        return []
    names = os.listdir(path)
    doomed = [path / n for n in names if TEMP_NAME.match(n) and not n.startswith(f"{LOCK}.")]
    doomed += [path / n for n in names if _dead_lock_temp(path / n)]
    for sub in _recorded(record, names):
        if (path / sub).is_dir() and not (path / sub).is_symlink():
            for root, subdirs, files in os.walk(path / sub, followlinks=False):
                doomed += [Path(root) / n for n in [*files, *subdirs] if TEMP_NAME.match(n)]
                subdirs[:] = [d for d in subdirs if not TEMP_NAME.match(d)]
    for p in doomed:
        _remove_entry(p)
    return doomed


class OutDir:
    """A claimed output directory: its path, its lock (None on ranks but 0 or for commands that
    do not lock) and `declare`, which adds entries to the record before they are written."""

    def __init__(self, path: Path, command: str, lock: DirLock | None) -> None:
        self.path = path
        self.command = command
        self.lock = lock

    def declare(self, entries: Iterable[str] = (), patterns: Iterable[str] = ()) -> None:
        """Record top-level names (or fnmatch patterns) as uvq's before writing them, so that a
        later --overwrite removes them even if this run is killed halfway."""
        record = read_record(self.path) or _new_record(self.command)
        old = (list(record["entries"] or []), list(record.get("patterns") or []))
        record["entries"] = sorted(set(old[0]) | set(entries))
        record["patterns"] = sorted(set(old[1]) | set(patterns))
        if (record["entries"], record["patterns"]) != (sorted(old[0]), sorted(old[1])):
            _write_record(self.path, record)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> OutDir:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _new_record(command: str) -> dict[str, Any]:
    return {"format": RECORD_FORMAT, "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "entries": [], "patterns": []}


def record_written_dir(path: str | Path, *, command: str) -> None:
    """Record every entry of `path` as uvq's: for a directory uvq has just written whole (by rename)."""
    path = Path(path)
    record = _new_record(command)
    record["entries"] = sorted(n for n in os.listdir(path) if not _is_bookkeeping(n))
    _write_record(path, record)


def mark_requeue(path: str | Path, reason: str, saved: str) -> Path | None:
    """Leave `<path>/.uvq.requeue` (JSON: reason, what was saved, time) in a directory uvq owns.

    The mark a job script reads to requeue itself, since torchrun reports a worker's exit 75 as 1
    (docs/cluster.md); the next claim of the directory removes it. None where `path` is not a
    uvq directory (nothing is written into a directory uvq does not own).
    """
    path = Path(path)
    if read_record(path) is None:
        return None
    mark = path / REQUEUE
    atomic_write_json(mark, {"reason": reason, "saved": saved, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return mark


def claim_out_dir(path: str | Path, *, command: str, overwrite: bool = False, resume: bool = False,
                  inputs: Iterable[str | Path | None] = (), entries: Iterable[str] = (),
                  patterns: Iterable[str] = (), lock: bool = True) -> OutDir:
    """Take `path` for `uvq <command>`: check (as check_out_dir), lock, check again under the lock,
    then write: remove the recorded entries (overwrite), write the record with `entries` and
    `patterns` declared, remove leftover temporary names. Returns the OutDir (release its lock
    when done; it is also released at exit). `lock=False` on ranks but 0 and for one-shot writers.
    """
    path = Path(path)
    inputs = list(inputs)
    check_out_dir(path, command=command, overwrite=overwrite, resume=resume, inputs=inputs)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_error(exc, path, "create") from exc
    held = DirLock(path, command).acquire() if lock else None
    try:
        plan = check_out_dir(path, command=command, overwrite=overwrite, resume=resume, inputs=inputs)
        record = plan.record
        if plan.action == "overwrite":
            for name in _recorded(record, os.listdir(path)):
                if not _is_bookkeeping(name):
                    _remove_entry(path / name)
            record = None
        if record is None or record.get("entries") is None:  # new, or a marker of an older uvq: start a record
            record = _new_record(command)
        record["entries"] = sorted(set(record["entries"]) | set(entries))
        record["patterns"] = sorted(set(record.get("patterns") or []) | set(patterns))
        _write_record(path, record)
        remove_leftover_temps(path)
        (path / REQUEUE).unlink(missing_ok=True)  # a command continues here: no longer waiting for a requeue
    except OSError as exc:
        if held is not None:
            held.release()
        raise disk_error(exc, path) from exc
    except BaseException:
        if held is not None:
            held.release()
        raise
    return OutDir(path, command, held)


# ---------------------------------------------------------------------------------------------
# One writer per directory
# ---------------------------------------------------------------------------------------------

_LIVE: weakref.WeakValueDictionary[str, DirLock] = weakref.WeakValueDictionary()  # token -> lock held here


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@dataclass
class DirLock:
    """`<dir>/.uvq.lock`: JSON naming the holder (host, pid, time, command).

    Created complete by linking a finished temporary file to the lock name (os.link fails when
    the name exists, like O_EXCL, and a reader never sees a half-written lock). A lock whose
    holder is dead on this host, or one left by this process without a live holder (an
    exception skipped its release), is stale: it is taken over under `.uvq.lock.takeover`, an
    O_EXCL file, so two processes never both take it. Released by `release()`, at exit, or when
    the holder object is collected.
    """

    dir: Path
    command: str
    token: str = field(default="")

    @property
    def file(self) -> Path:
        return self.dir / LOCK

    def acquire(self) -> DirLock:
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}:{id(self)}"
        info = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": self.command, "token": self.token}
        for _ in range(3):
            if self._create(info):
                _LIVE[self.token] = self
                self._finalizer = weakref.finalize(self, _release_file, self.file, self.token)
                return self
            holder = self._holder()
            if holder is not None and not self._stale(holder):
                raise UserError(f"{self.dir} is in use by `uvq {holder.get('command')}` (pid {holder.get('pid')} on "
                                f"{holder.get('host')}, since {holder.get('time')}); wait for it to finish, or delete "
                                f"{self.file} if that process is gone")
            self._take_over(holder)
        raise UserError(f"cannot lock {self.dir}: {self.file} keeps changing; is another uvq starting there?")

    def _create(self, info: dict[str, Any]) -> bool:
        tmp = self.dir / f"{LOCK}.{os.getpid()}.{id(self)}.tmp"
        try:
            tmp.write_text(json.dumps(info) + "\n")
            try:
                os.link(tmp, self.file)
            except FileExistsError:
                return False
            except OSError as exc:  # file systems without hard links: an O_EXCL create
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                try:
                    fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as fh:
                    fh.write(json.dumps(info) + "\n")
            return True
        except OSError as exc:
            raise disk_error(exc, self.file, "lock") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _holder(self) -> dict[str, Any] | None:
        """The lock's content; None when it vanished; {} when it cannot be read (a foreign writer)."""
        try:
            data = json.loads(self.file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False  # another host's process cannot be checked from here
        if holder["pid"] == os.getpid():
            return holder.get("token") not in _LIVE
        return not _pid_alive(holder["pid"])

    def _take_over(self, holder: dict[str, Any] | None) -> None:
        """Remove the stale lock `holder`, if it is still the one there, under the takeover file."""
        if holder is None:
            return  # it vanished: try creating again
        guard = self.dir / f"{LOCK}.takeover"
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - guard.stat().st_mtime > 30:  # its taker died within these few lines
                    guard.unlink()
            time.sleep(0.05)
            return
        os.close(fd)
        try:
            if self._holder() == holder:
                self.file.unlink()
        finally:
            guard.unlink()

    def release(self) -> None:
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()  # runs _release_file once
        _LIVE.pop(self.token, None)


def _release_file(file: Path, token: str) -> None:
    """Unlink the lock file if it is still ours (a takeover may have replaced it)."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and data.get("token") == token:
        with contextlib.suppress(FileNotFoundError):
            file.unlink()
