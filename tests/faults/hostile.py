"""Hostile and damaged copies of good checkpoints, as a careless user, a crash or an attacker makes them.

Every function takes a good checkpoint directory (or run directory) written by uvq's own save
functions and returns a damaged copy beside it (or at `out`); the original is never touched.
A "consistent" fault also rewrites the sha256 in meta.json, as a tool that re-saves the file
would, so that only the structural checks can catch it. tests/test_integrity.py asserts that
uvq refuses each one with one line; the fault-injection suite runs them as cases.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from uvq.files import sha256_file

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def copy_of(src: str | Path, tag: str, out: str | Path | None = None) -> Path:
    """A copy of the directory `src` (symlinks kept as links) at `out` or `<src>-<tag>`."""
    src = Path(src)
    dst = Path(out) if out is not None else src.with_name(f"{src.name}-{tag}")
    shutil.copytree(src, dst, symlinks=True)
    return dst


def read_meta_json(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


def write_meta_json(ckpt: Path, meta) -> None:
    (ckpt / "meta.json").write_text(json.dumps(meta, indent=2))


def _resave(ckpt: Path, file: str, change) -> Path:
    """Rewrite the weight file `file` through `change(state_dict)` and record its new sha256."""
    which = file.split(".")[0]
    sd = load_file(str(ckpt / file))
    change(sd)
    save_file(sd, str(ckpt / file))
    meta = read_meta_json(ckpt)
    meta["weights_sha256"][which] = sha256_file(ckpt / file)
    write_meta_json(ckpt, meta)
    return ckpt


def _first_float(sd: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in sorted(sd.items()) if v.is_floating_point() and v.numel() > 1)


# ---------------------------------------------------------------------------------------------
# Damaged weights
# ---------------------------------------------------------------------------------------------


def flipped_bytes(ckpt, file: str = "ema.safetensors", n: int = 2, out=None) -> Path:
    """`n` bytes of the tensor data inverted (a bad disk or transfer); meta.json left as it was."""
    dst = copy_of(ckpt, "flipped", out)
    f = dst / file
    data = bytearray(f.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # safetensors: u64 header length, header, then data
    for i in range(n):
        data[start + 16 + 4 * i] ^= 0xFF
    f.write_bytes(bytes(data))
    return dst


def wrong_shape(ckpt, file: str = "model.safetensors", out=None) -> Path:
    """One tensor with an extra row, the sha256 updated."""
    def change(sd):
        k = _first_float(sd)
        sd[k] = torch.cat([sd[k], sd[k][:1]])
    return _resave(copy_of(ckpt, "shape", out), file, change)


def nan_weights(ckpt, file: str = "model.safetensors", value: float = float("nan"), out=None) -> Path:
    """One weight set to NaN (or `value`, e.g. inf), the sha256 updated."""
    def change(sd):
        k = _first_float(sd)
        sd[k] = sd[k].clone()
        sd[k].view(-1)[0] = value
    return _resave(copy_of(ckpt, "nan", out), file, change)


def int64_weights(ckpt, file: str = "model.safetensors", out=None) -> Path:
    """One float tensor stored as int64, the sha256 updated."""
    def change(sd):
        k = _first_float(sd)
        sd[k] = sd[k].round().to(torch.int64)
    return _resave(copy_of(ckpt, "int64", out), file, change)


# ---------------------------------------------------------------------------------------------
# Hostile meta.json
# ---------------------------------------------------------------------------------------------


def edited_meta(ckpt, tag: str, edit, out=None) -> Path:
    """A copy whose meta.json is what `edit(meta)` returns (None: `meta` as `edit` changed it in place)."""
    dst = copy_of(ckpt, tag, out)
    meta = read_meta_json(dst)
    new = edit(meta)
    write_meta_json(dst, meta if new is None else new)
    return dst


def absurd_architecture(ckpt, out=None) -> Path:
    """A model config asking for tens of GB: the widest layer multiplied by 2^12 (VQGAN nf, prior n_embd)."""
    def edit(meta):
        mc = meta["model_config"]
        key = "nf" if meta["kind"] == "vqgan" else "n_embd"
        mc[key] = int(mc[key]) * 4096
    return edited_meta(ckpt, "absurd", edit, out)


def huge_img_size(ckpt, size: int = 65536, out=None) -> Path:
    """A VQGAN whose img_size is `size` (the weights are unchanged: convolutions fit any size)."""
    def edit(meta):
        meta["model_config"]["img_size"] = size
    return edited_meta(ckpt, "imgsize", edit, out)


def non_object_meta(ckpt, value=(1, 2, 3), out=None) -> Path:
    """meta.json holding a JSON array (or any `value`) instead of an object."""
    return edited_meta(ckpt, "nonobject", lambda meta: list(value) if isinstance(value, tuple) else value, out)


def pipe_source(ckpt, command: str = "touch PWNED; cat good.tar", out=None) -> Path:
    """A checkpoint whose saved config names the data source `pipe:<command>` (a shell command)."""
    def edit(meta):
        meta.setdefault("config", {}).setdefault("data", {})["source"] = f"pipe:{command}"
    return edited_meta(ckpt, "pipe", edit, out)


# ---------------------------------------------------------------------------------------------
# Trainer state and links
# ---------------------------------------------------------------------------------------------


def swapped_trainer(ckpt, donor, out=None) -> Path:
    """`ckpt` with the trainer.pt of another checkpoint (another run, step or kind)."""
    dst = copy_of(ckpt, "swapped", out)
    shutil.copyfile(Path(donor) / "trainer.pt", dst / "trainer.pt")
    return dst


def dangling_last(run, out=None) -> Path:
    """A run directory copy whose `last` names a deleted checkpoint (the newest step directory removed)."""
    dst = copy_of(run, "dangling", out)
    root = dst / "checkpoints"
    target = os.readlink(root / "last")
    shutil.rmtree(root / target)
    return dst


def last_to(run, ckpt, name: str = "step-99999999", out=None) -> Path:
    """A run directory copy whose `last` points at a copy of `ckpt` (e.g. a prior in a VQGAN run)."""
    dst = copy_of(run, "otherlast", out)
    shutil.copytree(ckpt, dst / "checkpoints" / name)
    (dst / "checkpoints" / "last").unlink()
    os.symlink(name, dst / "checkpoints" / "last")
    return dst


def stale_best(run, name: str, out=None) -> Path:
    """A run directory copy whose `best` names `name`, not the checkpoint the records call best
    (killed between writing a better checkpoint and moving the link)."""
    dst = copy_of(run, "stalebest", out)
    (dst / "checkpoints" / "best").unlink(missing_ok=True)
    os.symlink(name, dst / "checkpoints" / "best")
    return dst


ALL_CHECKPOINT_FAULTS = {
    "flipped_bytes": flipped_bytes, "wrong_shape": wrong_shape, "nan_weights": nan_weights,
    "int64_weights": int64_weights, "absurd_architecture": absurd_architecture, "non_object_meta": non_object_meta,
}
