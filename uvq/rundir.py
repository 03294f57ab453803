"""The run directory of a training loop: everything needed to understand and rebuild a run.

    runs/vqgan-demo/
      .uvq               ownership record: uvq made this directory, and what it wrote (uvq.files)
      .uvq.lock          held by the run writing here (host, pid); one writer per directory
      config.yaml        the resolved config of the latest (re)start
      command.txt        the exact command line, one line per start or resume
      env.json           uvq and torch versions, device, world size, git commit
      metrics.jsonl      one JSON object per log step, appended and flushed
      events.out.tfevents.*   TensorBoard scalars, when tensorboard is installed
      images/            PNG grids (reconstructions, samples)
      checkpoints/       step-XXXXXXXX/ directories and the `last` link (uvq.checkpoint)

Shared by `fit-vqgan` and `fit-prior`. Under torchrun only rank 0 writes; the other ranks hold a
RunDir whose writing methods do nothing, so loops call them without asking who they are.
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from uvq import __version__
from uvq.checkpoint import resume_checkpoint, save_checkpoint
from uvq.config import drop_legacy_keys
from uvq.files import (
    OutDir,
    atomic_write_json,
    atomic_write_text,
    check_out_dir,
    claim_out_dir,
    disk_error,
)
from uvq.runtime import DistInfo, UserError


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit() -> str | None:
    """The commit of the uvq source tree, when it is a git checkout (None otherwise)."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def environment(device: torch.device, world_size: int) -> dict[str, Any]:
    env = {
        "uvq_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "world_size": world_size,
        "git_commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
        env["cuda_version"] = torch.version.cuda
    return env


def _agree(error: str | None, dist: DistInfo) -> None:
    """Rank 0 decides; every rank raises the same UserError (no rank is left waiting)."""
    if dist.enabled:
        import torch.distributed

        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UserError(error)


# What a run directory holds, recorded as uvq's before it is written (uvq.files.claim_out_dir).
RUN_ENTRIES = ("config.yaml", "command.txt", "env.json", "metrics.jsonl", "images", "checkpoints")
RUN_PATTERNS = ("events.out.tfevents.*",)


class RunDir:
    """A run directory; `writes` is False on every rank but 0."""

    def __init__(self, path: str | Path, *, writes: bool = True) -> None:
        self.path = Path(path)
        self.writes = writes
        self._out: OutDir | None = None  # rank 0's claim, holding the directory's lock
        self._metrics_fh = None
        self._tb = None
        self._tb_tried = False

    # ---- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, config: dict[str, Any], *, command: str, argv: list[str] | None,
             device: torch.device, dist: DistInfo = DistInfo(), resume: bool = False, overwrite: bool = False,
             inputs: tuple[str | Path | None, ...] = ()) -> tuple[RunDir, list[str]]:
        """Take `path` for a new run of `uvq <command>`, or reopen it with `resume`; rank 0 locks it
        until `close()`. Returns the run dir and the config keys that differ from the run's saved
        config (a resume may change e.g. train.steps, never the model). `inputs` are the run's
        input paths, which the directory may not overlap (uvq.files.check_out_dir). Everything is
        checked before the first write.
        """
        run = cls(path, writes=dist.is_main)
        error, changed = None, []
        if dist.is_main:
            try:
                check_out_dir(run.path, command=command, overwrite=overwrite, resume=resume, inputs=inputs)
                saved = run._saved_config() if resume else None
                if resume and saved is not None:
                    changed = run._check_resumable(saved, config)
                run._out = claim_out_dir(run.path, command=command, overwrite=overwrite, resume=resume, inputs=inputs,
                                         entries=RUN_ENTRIES, patterns=RUN_PATTERNS)
                run._write_start_files(config, argv, device, dist.world_size, resume)
            except (UserError, OSError) as exc:
                error = str(exc if isinstance(exc, UserError) else disk_error(exc, run.path))
                run.close()
        _agree(error, dist)
        return run, changed

    def _saved_config(self) -> dict[str, Any] | None:
        f = self.path / "config.yaml"
        if not f.is_file():
            return None
        return drop_legacy_keys(yaml.safe_load(f.read_text()))

    def _check_resumable(self, saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
        old, new = _flatten(saved), _flatten(config)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        model = [k for k in changed if k.startswith("model.")]
        if model:
            raise UserError(f"cannot resume {self.path}: the model config differs from the run's ({', '.join(model[:4])}); "
                            "resume with the run's own recipe (its config.yaml) or start a new --out")
        return changed

    def _write_start_files(self, config: dict[str, Any], argv: list[str] | None, device: torch.device,
                           world_size: int, resume: bool) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        line = shlex.join(argv) if argv else "(called from Python)"
        previous = (self.path / "command.txt").read_text() if resume and (self.path / "command.txt").is_file() else ""
        atomic_write_text(self.path / "command.txt", previous + line + "\n")
        env = environment(device, world_size)
        if resume and (self.path / "env.json").is_file():
            try:
                old = json.loads((self.path / "env.json").read_text())
            except json.JSONDecodeError:
                old = {}
            env["previous"] = old.get("previous", []) + [{k: v for k, v in old.items() if k != "previous"}]
        atomic_write_json(self.path / "env.json", env)
        (self.path / "images").mkdir(exist_ok=True)
        (self.path / "checkpoints").mkdir(exist_ok=True)

    # ---- reading ----------------------------------------------------------------------------

    @property
    def images_dir(self) -> Path:
        return self.path / "images"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    def last_checkpoint(self) -> Path | None:
        """The checkpoint `last` points at; every rank may call this (it only reads)."""
        last = self.checkpoints_dir / "last"
        return last.resolve() if (last / "meta.json").is_file() else None

    def resume_point(self, dist: DistInfo = DistInfo(), kind: str | None = None) -> Path | None:
        """The checkpoint to resume from, as rank 0 sees it, on every rank (absolute path or None).

        Rank 0 checks and repairs the links (uvq.checkpoint.resume_checkpoint: a dangling `last`
        or one of another `kind` is refused) and broadcasts, so that all ranks load the same step
        even if `last` moves or a rank's view of the file system lags, and all raise the same error.
        """
        error, found = None, None
        if dist.is_main:
            try:
                found = resume_checkpoint(self.path, kind, repair=self.writes)
            except UserError as exc:
                error = str(exc)
        box = [error, str(found) if found else None]
        if dist.enabled:
            import torch.distributed

            torch.distributed.broadcast_object_list(box, src=0)
        if box[0]:
            raise UserError(box[0])
        return Path(box[1]) if box[1] else None

    def read_metrics(self) -> list[dict[str, Any]]:
        """The logged records, in order. A torn last line (a killed write) is left out; see `_read_metrics`."""
        return self._read_metrics()[0]

    def _read_metrics(self) -> tuple[list[dict[str, Any]], int]:
        """(records, 1 if the last line was torn else 0). Only the last line can be torn: the file is
        appended line by line and flushed, so a damaged line before it is refused."""
        f = self.path / "metrics.jsonl"
        if not f.is_file():
            return [], 0
        lines = [line for line in f.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        records: list[dict[str, Any]] = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if i == len(lines) - 1:
                    return records, 1
                raise UserError(f"{f} line {i + 1} is not JSON ({exc.msg}); the file is damaged: "
                                "repair or delete that line and resume again") from exc
        return records, 0

    # ---- writing (rank 0 only) --------------------------------------------------------------

    def truncate_metrics(self, step: int) -> int:
        """Drop records logged after `step` (a killed run resumes from its last checkpoint, or from
        step 0), and a torn last line. Returns how many torn lines were dropped (0 or 1)."""
        if not self.writes:
            return 0
        self._close_metrics()
        f = self.path / "metrics.jsonl"
        if not f.is_file():
            return 0
        records, torn = self._read_metrics()
        keep = [json.dumps(r) for r in records if r.get("step", 0) <= step]
        atomic_write_text(f, "".join(line + "\n" for line in keep))
        return torn

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one JSON line (flushed at once) and, when tensorboard is installed, scalars."""
        if not self.writes:
            return
        if self._metrics_fh is None:
            self._metrics_fh = open(self.path / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._metrics_fh.write(json.dumps({"step": int(step), **metrics}, default=float) + "\n")
        self._metrics_fh.flush()
        tb = self._tensorboard()
        if tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    tb.add_scalar(k, v, step)
            tb.flush()

    def _tensorboard(self):
        if not self._tb_tried:
            self._tb_tried = True
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional (pip install "uvq[tensorboard]")
                return None
            self._tb = SummaryWriter(log_dir=str(self.path))
        return self._tb

    def image_path(self, tag: str, step: int) -> Path:
        return self.images_dir / f"{tag}-{step:08d}.png"

    def save_checkpoint(self, step: int, *, keep_last: int, **kwargs) -> Path | None:
        """uvq.checkpoint.save_checkpoint into checkpoints/ (atomic; keeps the last K)."""
        if not self.writes:
            return None
        return save_checkpoint(self.path, step, keep_last=keep_last, **kwargs)

    def _close_metrics(self) -> None:
        if self._metrics_fh is not None:
            self._metrics_fh.close()
            self._metrics_fh = None

    def close(self) -> None:
        """Close the logs and release the directory's lock (it is also released at exit)."""
        self._close_metrics()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._out is not None:
            self._out.release()
            self._out = None
