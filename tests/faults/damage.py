"""Hostile inputs other than damaged checkpoints (those are in hostile.py): pickle payloads, broken
safetensors headers, YAML bombs, decompression-bomb PNGs, tar traversal, codes >= K, symlink loops.

Each payload that would run code only creates a marker file, so a test can tell whether it ran.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


class _Payload:
    """Unpickling this runs `os.system(command)`: what a hostile `.pt` file does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def pickle_payload(path: Path, marker: Path) -> Path:
    """A file that `torch.load(weights_only=False)` or `pickle.load` would execute (it touches `marker`)."""
    path.write_bytes(pickle.dumps({"state_dict": _Payload(f"touch {marker}")}))
    return path


def malformed_safetensors(path: Path, how: str) -> Path:
    """Replace a safetensors file by one with a broken header: `huge` (a 2^40-byte header length),
    `garbage` (a header that is not JSON) or `offsets` (a tensor whose offsets run past the file)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    if how == "huge":
        path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    elif how == "garbage":
        junk = b"{not json" + b" " * (n - 9)
        path.write_bytes(data[:8] + junk + data[8 + n:])
    else:
        name = next(k for k in header if k != "__metadata__")
        begin, _ = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin, begin + (1 << 30)]
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return path


def yaml_bomb(path: Path, levels: int = 9) -> Path:
    """A billion-laughs recipe: 9 levels of 9 aliases each expand to 9^9 strings."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append(f"data:\n  source: *a{levels - 1}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def decompression_bomb_png(path: Path, side: int = 100_000) -> Path:
    """A few-hundred-byte PNG that declares side x side pixels (10^10 at the default): decoding it
    would need tens of GB. Its IDAT holds the first rows only."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * (side + 1) * 4, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def image_folder(root: Path, n: int = 12, size: int = 16) -> Path:
    """`n` small real PNG images in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    return root


def symlink_loop(root: Path) -> Path:
    """A folder of images whose subfolder links back to the folder itself."""
    image_folder(root / "sub")
    os.symlink("..", root / "sub" / "loop")
    return root


def traversal_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A tar whose member names are given as is, e.g. `../../evil.png` (tar path traversal)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def png_bytes_of(size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def codes_out_of_range(latents: Path, value: int) -> Path:
    """Rewrite the first train shard of a latents directory with one code `value` (>= K), the
    manifest's count and sha256 updated so that only a range check can catch it."""
    from uvq.files import sha256_file
    from uvq.prior.latents import read_shard, write_shard

    manifest_path = latents / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = next(s for s in manifest["shards"] if s["split"] == "train")
    shard = latents / entry["name"]
    items = list(read_shard(shard))
    codes = items[0][1].copy()
    codes.flat[0] = value
    items[0] = (items[0][0], codes)
    shard.unlink()
    write_shard(shard, items)
    entry["sha256"] = sha256_file(shard)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return latents
