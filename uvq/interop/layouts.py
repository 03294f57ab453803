"""Foreign layouts: reading other code's checkpoints (docs/method.md section 8).

Three layouts come in, all plain tensors loaded with `torch.load(weights_only=True)`:

- the authors' VQGAN (samb-t/unleashing-transformers, `vqgan_ema_<step>.th`): `ae.encoder.blocks.<i>`,
  `ae.quantize.embedding.weight`, `ae.generator.blocks.<i>`, the optional likelihood head
  `ae.generator.logsigma.*`, the discriminator `disc.*` and an LPIPS copy `perceptual.*`;
- the authors' prior (`absorbing_ema_<step>.th`): `_denoise_fn.*`, the loss trackers
  `Lt_history`, `Lt_count`, `loss_history`, a codebook copy `embedding_weight`, and the unused
  `_denoise_fn.start_tok`;
- taming-transformers' VQModel, a Lightning checkpoint `{"state_dict": {encoder.*, decoder.*,
  quantize.embedding.weight, quant_conv.*, post_quant_conv.*, loss.*}}`.

This module loads such files safely (tensors only, never code), tells the layouts apart, reads
the architecture off the keys and shapes (the head count, which shapes cannot tell, comes from the
user or a preset), checks it against the paper's presets, and maps every key onto uvq's modules
or ignores it for a stated reason; anything else stops the import with the lists of missing and
unexpected keys. The import itself (writing, verification, provenance) is `uvq.interop.convert`.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uvq.interop.reference import official_blocks, taming_levels
from uvq.progress import ProgressFn, null_progress
from uvq.runtime import UserError

PRESETS = ("ffhq", "churches", "bedroom")  # the paper's models, as in recipes/<name>.yaml
MAX_UNPACKED_BYTES = 16_000_000_000  # uvq.checkpoint.MAX_PARAMETERS float32 parameters, twice (weights and EMA)

Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Safe loading: tensors only, never code
# ---------------------------------------------------------------------------------------------


def _pickle_globals(path: Path) -> list[str]:
    """The classes / functions a pickle would import, found without running it.

    A zip checkpoint is asked through torch's own static scan; a bare pickle is walked opcode by
    opcode with pickletools (which decodes, never executes).
    """
    if zipfile.is_zipfile(path):
        with contextlib.suppress(Exception):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        return []
    found: list[str] = []
    strings: list[str] = []
    memo: dict[int, Any] = {}
    try:
        with open(path, "rb") as fh:
            for op, arg, _ in pickletools.genops(fh):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                               "BINSTRING", "SHORT_BINSTRING"):
                    strings.append(str(arg))
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(int(arg)), str):
                    strings.append(memo[int(arg)])
                elif op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
    except Exception:
        return found
    return found


def load_tensor_file(path: str | Path, role: str) -> dict[str, Any]:
    """`torch.load(path, weights_only=True)`, with one clear line for every way it can fail.

    `role` names the option the file came from ("--vqgan", "--prior") for the messages.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{role} {path} does not exist")
    if path.is_dir():
        raise UserError(f"{role} {path} is a directory; give the checkpoint file itself "
                        "(e.g. logs/<run>/saved_models/vqgan_ema_<step>.th)")
    if path.stat().st_size == 0:
        raise UserError(f"{role} {path} is empty (0 bytes); download it again")
    if zipfile.is_zipfile(path):  # a zip's members may be compressed: refuse one that would unpack huge
        with contextlib.suppress(zipfile.BadZipFile, OSError), zipfile.ZipFile(path) as zf:
            unpacked = sum(i.file_size for i in zf.infolist())
            if unpacked > MAX_UNPACKED_BYTES:
                raise UserError(f"{role} {path} would unpack to {unpacked / 1e9:.0f} GB (more than "
                                f"{MAX_UNPACKED_BYTES / 1e9:.0f} GB, 2e9 float32 parameters twice over); it is not a "
                                "checkpoint of these models")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses anyway
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _pickle_globals(path)
        blocked = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if names or blocked:
            what = ", ".join(sorted(set(names))[:3]) if names else blocked.group(1)
            raise UserError(f"{role} {path} was refused: loading it would import and run code ({what}), and uvq "
                            "only loads plain tensors; if you trust the file, re-save its state dict alone "
                            "with torch.save(state_dict) where it can be loaded, then import that") from None
        raise UserError(f"{role} {path} is not a PyTorch checkpoint, or it is damaged; download it again") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise UserError(f"{role} {path} is truncated or damaged ({type(exc).__name__}: {_first_line(exc)}); "
                        "download it again and check its size") from None
    if not isinstance(obj, Mapping):
        raise UserError(f"{role} {path} holds a {type(obj).__name__}, not a state dict of tensors")
    return dict(obj)


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message, short enough for a one-line error."""
    text = str(exc).strip().split(". ")[0].splitlines()
    return text[0][:120] if text else "no details"


def _tensors_only(sd: Mapping[str, Any], path: Path, role: str) -> Tensors:
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{role} {path} is not a state dict of tensors: entries {bad[:4]} are not tensors")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{role} {path} holds NaN or infinite values in {bad[:4]}; the file is damaged: download it again")
    return dict(sd)


# ---------------------------------------------------------------------------------------------
# Telling the layouts apart ("a prior passed as --vqgan")
# ---------------------------------------------------------------------------------------------


def detect_layout(sd: Mapping[str, Any]) -> str:
    """'official-vqgan', 'official-prior', 'taming-vqgan', 'lightning', 'uvq-prior', 'uvq-vqgan' or 'unknown'."""
    keys = list(sd)
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        return "lightning"
    if any(k.startswith("ae.encoder.") for k in keys):
        return "official-vqgan"
    if any(k.startswith("_denoise_fn.") for k in keys):
        return "official-prior"
    if any(k.startswith("encoder.down.") for k in keys) and any(k.startswith("decoder.up.") for k in keys):
        return "taming-vqgan"
    if any(k.startswith("encoder.blocks.") for k in keys):
        return "uvq-vqgan"
    if "tok_emb.weight" in sd and "pos_emb" in sd:
        return "uvq-prior"
    return "unknown"


_LAYOUT_NAMES = {
    "official-vqgan": "an official (unleashing-transformers) VQGAN; pass it to `uvq import official --vqgan`",
    "official-prior": "an official (unleashing-transformers) absorbing prior; pass it to `uvq import official --prior`",
    "taming-vqgan": "a taming-transformers VQGAN; import it with `uvq import taming --vqgan`",
    "lightning": "a Lightning checkpoint (taming-transformers); import it with `uvq import taming --vqgan`",
    "uvq-vqgan": "the weights of a uvq VQGAN; uvq checkpoints need no import",
    "uvq-prior": "the weights of a uvq prior; uvq checkpoints need no import",
    "unknown": "not a layout uvq knows (expected ae.* keys for an official VQGAN, _denoise_fn.* for an "
               "official prior, or a Lightning state_dict of encoder/decoder/quantize for taming)",
}


def _expect_layout(sd: Mapping[str, Any], expected: str, path: Path, role: str) -> None:
    found = detect_layout(sd)
    if found != expected:
        raise UserError(f"{role} {path} is the wrong kind of file: it is {_LAYOUT_NAMES[found]}")


# ---------------------------------------------------------------------------------------------
# Architecture from the weights
# ---------------------------------------------------------------------------------------------


def _split_levels(blocks: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    levels: list[list[tuple[str, str]]] = [[]]
    for blk in blocks:
        if blk[1] == "resample":
            levels.append([])
        else:
            levels[-1].append(blk)
    return levels


def _level_shape(p: Tensors, level: list[tuple[str, str]], where: str, res_key: str = "conv1") -> tuple[int, int, int]:
    """(residual blocks, attention blocks, output channels) of one level."""
    kinds = [k for _, k in level]
    bad = [n for n, k in level if k not in ("res", "attn")]
    if bad or not kinds or kinds[0] != "res":
        raise UserError(f"cannot read the architecture of {where}: unexpected block layout {kinds}")
    res = [n for n, k in level if k == "res"]
    return len(res), kinds.count("attn"), int(p[res[-1] + f".{res_key}.weight"].shape[0])


def _attn_resolutions(levels_with_attn: list[int], img_size: int) -> list[int]:
    return sorted({img_size // 2 ** i for i in levels_with_attn}, reverse=True)


def _img_size_or_default(img_size: int | None, levels: int, progress: ProgressFn) -> int:
    if img_size is not None:
        if img_size % 2 ** (levels - 1):
            raise UserError(f"--img-size {img_size} is not a multiple of the downsampling factor {2 ** (levels - 1)}")
        return img_size
    progress({"event": "warn", "message": "the image size cannot be read from VQGAN weights; assuming 256 "
                                          "(the released models'); pass --img-size (or --prior) to set it"})
    return 256


def infer_official_vqgan(p: Tensors, img_size: int | None = None,
                         progress: ProgressFn | None = None) -> dict[str, Any]:
    """A VQGANConfig dict (variant official) from an authors' VQGAN state dict.

    Encoder blocks: conv_in, per level [res (attn)]*n and a downsample between levels, then
    res, attn, res, GroupNorm, conv. The generator mirrors it. The image size only fixes which
    resolution the attention levels are called; it comes from `img_size` (else 256).
    """
    progress = progress or null_progress
    enc = official_blocks(p, "ae.encoder.blocks")
    dec = official_blocks(p, "ae.generator.blocks")
    tail = [k for _, k in enc[-5:]]
    if len(enc) < 7 or enc[0][1] != "conv" or tail != ["res", "attn", "res", "norm", "conv"]:
        raise UserError(f"the official VQGAN encoder has an unexpected block layout {[k for _, k in enc]}")
    dtail = [k for _, k in dec[:4]] + [k for _, k in dec[-2:]]
    if len(dec) < 7 or dtail != ["conv", "res", "attn", "res", "norm", "conv"]:
        raise UserError(f"the official VQGAN generator has an unexpected block layout {[k for _, k in dec]}")
    nf = int(p[enc[0][0] + ".weight"].shape[0])
    in_channels = int(p[enc[0][0] + ".weight"].shape[1])
    emb_dim = int(p[enc[-1][0] + ".weight"].shape[0])
    enc_levels = [_level_shape(p, lv, f"encoder level {i}") for i, lv in enumerate(_split_levels(enc[1:-5]))]
    dec_levels = [_level_shape(p, lv, f"generator level {i}") for i, lv in enumerate(_split_levels(dec[4:-2]))][::-1]
    n_levels = len(enc_levels)
    if len(dec_levels) != n_levels:
        raise UserError(f"the official VQGAN's generator has {len(dec_levels)} levels but its encoder {n_levels}")
    res_blocks = {n for n, _, _ in enc_levels}
    dec_res = {n for n, _, _ in dec_levels}
    if len(res_blocks) != 1 or len(dec_res) != 1:
        raise UserError("the official VQGAN has levels with different numbers of residual blocks; uvq cannot hold it")
    ch_mult = []
    for i, ((_, _, c_enc), (_, _, c_dec)) in enumerate(zip(enc_levels, dec_levels, strict=True)):
        if c_enc % nf or c_enc != c_dec:
            raise UserError(f"the official VQGAN's level {i} has {c_enc} encoder and {c_dec} decoder channels; "
                            f"uvq needs equal multiples of nf={nf}")
        ch_mult.append(c_enc // nf)
    attn_enc = [i for i, (n, a, _) in enumerate(enc_levels) if a]
    attn_dec = [i for i, (n, a, _) in enumerate(dec_levels) if a]
    if attn_enc != attn_dec or any(a not in (0, n) for n, a, _ in enc_levels + dec_levels):
        raise UserError("the official VQGAN has attention at different levels in its encoder and generator; "
                        "uvq cannot hold it")
    codebook = p["ae.quantize.embedding.weight"]
    if int(codebook.shape[1]) != emb_dim:
        raise UserError(f"the codebook's vectors have {codebook.shape[1]} dimensions but the encoder outputs {emb_dim}")
    img = _img_size_or_default(img_size, n_levels, progress)
    return {
        "img_size": img, "in_channels": in_channels, "nf": nf, "ch_mult": ch_mult,
        "res_blocks": res_blocks.pop(), "dec_res_blocks": dec_res.pop(),
        "attn_resolutions": _attn_resolutions(attn_enc, img), "emb_dim": emb_dim, "z_channels": None,
        "codebook_size": int(codebook.shape[0]), "variant": "official",
        "likelihood_head": any(k.startswith("ae.generator.logsigma.") for k in p),
    }


def infer_taming_vqgan(p: Tensors, img_size: int | None = None, progress: ProgressFn | None = None) -> dict[str, Any]:
    """A VQGANConfig dict (variant taming) from a taming VQModel state dict (ddconfig from shapes)."""
    progress = progress or null_progress
    for key in ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight", "quant_conv.weight",
                "post_quant_conv.weight", "quantize.embedding.weight"):
        if key not in p:
            hint = (" (a Gumbel or other quantizer; only VectorQuantizer2 models are supported)"
                    if key == "quantize.embedding.weight" and any(k.startswith("quantize.") for k in p) else "")
            raise UserError(f"the taming checkpoint lacks {key}{hint}")
    ch = int(p["encoder.conv_in.weight"].shape[0])
    in_channels = int(p["encoder.conv_in.weight"].shape[1])
    z_channels = int(p["encoder.conv_out.weight"].shape[0])
    emb_dim, quant_in = (int(s) for s in p["quant_conv.weight"].shape[:2])
    if quant_in != z_channels:
        raise UserError(f"the taming encoder outputs {z_channels} channels but quant_conv takes {quant_in} "
                        "(double_z models are not VQGANs)")
    levels = taming_levels(p, "encoder.down")
    enc_res, dec_res, ch_mult, attn_levels, dec_attn = set(), set(), [], [], []
    for i in levels:
        blocks = taming_levels(p, f"encoder.down.{i}.block")
        enc_res.add(len(blocks))
        out_ch = int(p[f"encoder.down.{i}.block.{blocks[-1]}.conv1.weight"].shape[0])
        if out_ch % ch:
            raise UserError(f"taming encoder level {i} has {out_ch} channels, not a multiple of ch={ch}")
        ch_mult.append(out_ch // ch)
        if taming_levels(p, f"encoder.down.{i}.attn"):
            attn_levels.append(i)
        up_blocks = taming_levels(p, f"decoder.up.{i}.block")
        dec_res.add(len(up_blocks))
        if up_blocks and int(p[f"decoder.up.{i}.block.{up_blocks[-1]}.conv1.weight"].shape[0]) != out_ch:
            raise UserError(f"taming decoder level {i} does not mirror the encoder's channels")
        if taming_levels(p, f"decoder.up.{i}.attn"):
            dec_attn.append(i)
    if taming_levels(p, "decoder.up") != levels:
        raise UserError("the taming decoder's levels do not mirror the encoder's")
    if len(enc_res) != 1 or len(dec_res) != 1:
        raise UserError("the taming VQGAN has levels with different numbers of residual blocks; uvq cannot hold it")
    if attn_levels != dec_attn:
        raise UserError("the taming VQGAN has attention at different levels in encoder and decoder; uvq cannot hold it")
    if any(".conv_shortcut." in k for k in p):
        raise UserError("the taming VQGAN uses 3x3 conv shortcuts (conv_shortcut=True); uvq supports the default 1x1")
    codebook = p["quantize.embedding.weight"]
    if int(codebook.shape[1]) != emb_dim:
        raise UserError(f"the codebook's vectors have {codebook.shape[1]} dimensions but quant_conv outputs {emb_dim}")
    img = _img_size_or_default(img_size, len(levels), progress)
    return {
        "img_size": img, "in_channels": in_channels, "nf": ch, "ch_mult": ch_mult, "res_blocks": enc_res.pop(),
        "dec_res_blocks": dec_res.pop(), "attn_resolutions": _attn_resolutions(attn_levels, img),
        "emb_dim": emb_dim, "z_channels": z_channels, "codebook_size": int(codebook.shape[0]), "variant": "taming",
    }


def infer_official_prior(p: Tensors, n_head: int, latent_shape: tuple[int, int] | None = None) -> dict[str, Any]:
    """A PriorConfig dict from an authors' prior: K, N, width and depth from shapes; heads given."""
    pre = "_denoise_fn."
    for key in ("tok_emb.weight", "pos_emb", "ln_f.weight", "head.weight"):
        if pre + key not in p:
            raise UserError(f"the official prior lacks {pre + key}; the file is incomplete")
    vocab, n_embd = (int(s) for s in p[pre + "tok_emb.weight"].shape)
    n_tokens = int(p[pre + "pos_emb"].shape[1])
    codebook_size = vocab - 1  # the last entry is the mask token, id K
    if tuple(p[pre + "head.weight"].shape) != (codebook_size, n_embd):
        raise UserError(f"the official prior's head is {list(p[pre + 'head.weight'].shape)}, expected "
                        f"[{codebook_size}, {n_embd}] for K={codebook_size} codes (token embedding of K+1)")
    layers = sorted({int(k.split(".")[2]) for k in p if k.startswith(pre + "blocks.")})
    if layers != list(range(len(layers))) or not layers:
        raise UserError(f"the official prior's blocks are not numbered 0..n-1 (found {layers[:8]})")
    hidden = int(p[pre + "blocks.0.mlp.0.weight"].shape[0])
    if hidden != 4 * n_embd:
        raise UserError(f"the official prior's MLP has width {hidden}, uvq's transformer has 4 x {n_embd}")
    if n_head < 1 or n_embd % n_head:
        raise UserError(f"--heads {n_head} does not divide the width {n_embd}")
    if latent_shape is None:
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise UserError(f"the official prior has {n_tokens} positions, not a square grid; import it with its VQGAN")
        latent_shape = (side, side)
    if latent_shape[0] * latent_shape[1] != n_tokens:
        raise UserError(f"the prior has {n_tokens} positions but the VQGAN makes {latent_shape[0]}x{latent_shape[1]} "
                        "code grids; these files do not belong together")
    return {"n_embd": n_embd, "n_head": n_head, "n_layer": len(layers), "codebook_size": codebook_size,
            "latent_shape": [int(latent_shape[0]), int(latent_shape[1])]}


# ---------------------------------------------------------------------------------------------
# Presets: the paper's models, checked against what the weights say
# ---------------------------------------------------------------------------------------------


_VQGAN_ARCH = ("img_size", "in_channels", "nf", "ch_mult", "res_blocks", "decoder_res_blocks", "attn_resolutions",
               "emb_dim", "codebook_size", "variant")
_PRIOR_ARCH = ("n_embd", "n_layer", "codebook_size", "latent_shape")


def preset_configs(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The paper's VQGAN and prior sections for `name`, from the packaged recipe."""
    from uvq.config import load_config

    if name not in PRESETS:
        raise UserError(f"unknown --preset {name!r}; valid: {', '.join(PRESETS)}")
    cfg = load_config(name)
    return _asdict(cfg.model.vqgan), _asdict(cfg.model.prior)


def _asdict(section) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(section)


def _arch_value(cfg: dict[str, Any], key: str) -> Any:
    if key == "decoder_res_blocks":
        dec = cfg.get("dec_res_blocks")
        return dec if dec is not None else cfg["res_blocks"] + (1 if cfg.get("variant") == "taming" else 0)
    return list(cfg[key]) if isinstance(cfg[key], (list, tuple)) else cfg[key]


def check_against_preset(name: str, vqgan: dict[str, Any] | None, prior: dict[str, Any] | None) -> None:
    """Stop with the list of differences when the inferred architecture is not the paper's `name`."""
    want_vq, want_prior = preset_configs(name)
    diffs = []
    for got, want, keys, what in ((vqgan, want_vq, _VQGAN_ARCH, "vqgan"), (prior, want_prior, _PRIOR_ARCH, "prior")):
        if got is None:
            continue
        for key in keys:
            a, b = _arch_value(got, key), _arch_value(want, key)
            if a != b:
                diffs.append(f"{what}.{key} {a} (paper: {b})")
    if diffs:
        raise UserError(f"--preset {name}: the weights are not the paper's {name} model: {'; '.join(diffs)}; "
                        "drop --preset (and give --heads) to import them anyway")


# ---------------------------------------------------------------------------------------------
# Strict mapping: every key mapped onto uvq's module or ignored for a reason
# ---------------------------------------------------------------------------------------------


@dataclass
class KeyMap:
    """The result of mapping a foreign state dict onto a uvq module's names."""

    weights: Tensors = field(default_factory=dict)  # uvq name -> tensor
    source: dict[str, str] = field(default_factory=dict)  # uvq name -> foreign name(s)
    ignored: dict[str, list[str]] = field(default_factory=dict)  # reason -> foreign names
    unexpected: list[str] = field(default_factory=list)

    def ignore(self, key: str, reason: str) -> None:
        self.ignored.setdefault(reason, []).append(key)

    def put(self, name: str, value: torch.Tensor, src: str) -> None:
        self.weights[name] = value
        self.source[name] = src

    def summary(self) -> dict[str, Any]:
        return {"mapped": len(self.weights), "ignored": {r: len(k) for r, k in self.ignored.items()}}


def _finish(mapping: KeyMap, model: torch.nn.Module, what: str, path: Path) -> Tensors:
    """Check the mapped names and shapes against `model`'s state dict; one readable error otherwise."""
    target = model.state_dict()
    missing = sorted(set(target) - set(mapping.weights))
    extra = sorted(mapping.source[n] for n in set(mapping.weights) - set(target))
    unexpected = sorted(mapping.unexpected) + extra
    shapes = [f"{mapping.source[n]} {list(v.shape)} -> {n} {list(target[n].shape)}"
              for n, v in mapping.weights.items() if n in target and tuple(v.shape) != tuple(target[n].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:6])}"
                         f"{', ...' if len(unexpected) > 6 else ''})")
        if shapes:
            parts.append(f"wrong shapes ({'; '.join(shapes[:3])})")
        raise UserError(f"{path} does not map onto uvq's {what}: {'; '.join(parts)}; "
                        "the file is not the layout it claims, or was made by a modified version of that code")
    # fp16/bf16 sources become the model's dtype (fp32): the verification runs in fp32
    return {n: v.detach().to(target[n].dtype).contiguous() for n, v in mapping.weights.items()}


def _ignore_foreign(mapping: KeyMap, key: str, with_disc: bool, disc_prefix: str, lpips_prefix: str) -> bool:
    if key.startswith(lpips_prefix):
        mapping.ignore(key, "LPIPS copy (a loss network, not part of the model)")
        return True
    if key.startswith(disc_prefix):
        mapping.ignore(key, "discriminator (kept in discriminator.safetensors)" if with_disc
                       else "discriminator (pass --with-disc to keep it)")
        return True
    return False


def map_official_vqgan(p: Tensors, with_disc: bool = False) -> KeyMap:
    """ae.encoder.* -> encoder.*, ae.generator.* -> decoder.*, ae.quantize.* -> quantize.*.

    The authors' ResBlock owns a 1x1 conv_out even when the width does not change, and never
    uses it then (models/vqgan.py); uvq's owns it only when used, so those tensors are dropped.
    """
    m = KeyMap()
    for key, value in p.items():
        if _ignore_foreign(m, key, with_disc, "disc.", "perceptual."):
            continue
        if key.startswith("ae.encoder.") or key.startswith("ae.generator.") or key == "ae.quantize.embedding.weight":
            block = re.match(r"ae\.(encoder|generator)\.blocks\.(\d+)\.conv_out\.", key)
            if block:
                conv = p[key.rsplit(".", 1)[0] + ".weight"]
                if conv.shape[0] == conv.shape[1]:
                    m.ignore(key, "unused 1x1 shortcut of a same-width residual block")
                    continue
            name = key[len("ae."):].replace("generator.", "decoder.", 1)
            m.put(name, value, key)
        else:
            m.unexpected.append(key)
    return m


def _taming_block_keys(p: Tensors, prefix: str) -> Iterator[str]:
    return (k for k in p if k.startswith(prefix + "."))


def map_taming_vqgan(p: Tensors, with_disc: bool = False) -> KeyMap:
    """taming's nested Encoder/Decoder onto uvq's flat block lists, in construction order:

    encoder: conv_in, per level (block j, attn j)..., downsample; mid block_1, attn_1, block_2;
    norm_out; conv_out. decoder: conv_in; mid; per level from the coarsest (block j, attn j)...,
    upsample; norm_out; conv_out. A ResnetBlock's nin_shortcut is uvq's conv_out.
    """
    m = KeyMap()
    taken: set[str] = set()

    def move(src: str, dst: str) -> None:
        for key in list(_taming_block_keys(p, src)):
            rest = key[len(src) + 1:].replace("nin_shortcut.", "conv_out.")
            m.put(f"{dst}.{rest}", p[key], key)
            taken.add(key)

    def mid(net: str, i: int) -> int:
        for part in ("block_1", "attn_1", "block_2"):
            move(f"{net}.mid.{part}", f"{net}.blocks.{i}")
            i += 1
        return i

    # encoder
    i = 0
    move("encoder.conv_in", f"encoder.blocks.{i}")
    i += 1
    for lv in taming_levels(p, "encoder.down"):
        for j in taming_levels(p, f"encoder.down.{lv}.block"):
            move(f"encoder.down.{lv}.block.{j}", f"encoder.blocks.{i}")
            i += 1
            if f"encoder.down.{lv}.attn.{j}.q.weight" in p:
                move(f"encoder.down.{lv}.attn.{j}", f"encoder.blocks.{i}")
                i += 1
        if f"encoder.down.{lv}.downsample.conv.weight" in p:
            move(f"encoder.down.{lv}.downsample", f"encoder.blocks.{i}")
            i += 1
    i = mid("encoder", i)
    move("encoder.norm_out", f"encoder.blocks.{i}")
    move("encoder.conv_out", f"encoder.blocks.{i + 1}")
    # decoder
    move("decoder.conv_in", "decoder.blocks.0")
    i = mid("decoder", 1)
    for lv in reversed(taming_levels(p, "decoder.up")):
        for j in taming_levels(p, f"decoder.up.{lv}.block"):
            move(f"decoder.up.{lv}.block.{j}", f"decoder.blocks.{i}")
            i += 1
            if f"decoder.up.{lv}.attn.{j}.q.weight" in p:
                move(f"decoder.up.{lv}.attn.{j}", f"decoder.blocks.{i}")
                i += 1
        if f"decoder.up.{lv}.upsample.conv.weight" in p:
            move(f"decoder.up.{lv}.upsample", f"decoder.blocks.{i}")
            i += 1
    move("decoder.norm_out", f"decoder.blocks.{i}")
    move("decoder.conv_out", f"decoder.blocks.{i + 1}")
    for net in ("quant_conv", "post_quant_conv"):
        move(net, net)
    if "quantize.embedding.weight" in p:
        m.put("quantize.embedding.weight", p["quantize.embedding.weight"], "quantize.embedding.weight")
        taken.add("quantize.embedding.weight")
    for key in p:
        if key in taken:
            continue
        if _ignore_foreign(m, key, with_disc, "loss.discriminator.", "loss.perceptual_loss."):
            continue
        if key.startswith("loss."):
            m.ignore(key, "other loss parameters (e.g. logvar)")
        else:
            m.unexpected.append(key)
    return m


def map_official_prior(p: Tensors, fused_qkv: bool) -> KeyMap:
    """_denoise_fn.* -> uvq's transformer; query/key/value fused in that order when uvq fuses them."""
    m = KeyMap()
    pre = "_denoise_fn."
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in p.items():
        if key == pre + "start_tok":
            m.ignore(key, "start_tok (used only by the autoregressive variant)")
        elif key in ("Lt_history", "Lt_count", "loss_history"):
            m.ignore(key, "loss trackers of the authors' importance sampling")
        elif key == "embedding_weight":
            m.ignore(key, "codebook copy (checked against the VQGAN's)")
        elif key.startswith(pre):
            name = key[len(pre):]
            qkv = re.match(r"(blocks\.\d+\.attn)\.(query|key|value)\.(weight|bias)$", name)
            if qkv and fused_qkv:
                parts.setdefault(f"{qkv.group(1)}.qkv.{qkv.group(3)}", {})[qkv.group(2)] = (key, value)
            else:
                m.put(name, value, key)
        else:
            m.unexpected.append(key)
    for name, got in parts.items():
        if set(got) != {"query", "key", "value"}:
            for _, (key, _) in got.items():
                m.unexpected.append(key)
            continue
        m.put(name, torch.cat([got[t][1] for t in ("query", "key", "value")], dim=0),
              "+".join(got[t][0] for t in ("query", "key", "value")))
    return m


def _map_discriminator(p: Tensors, prefix: str, path: Path) -> tuple[torch.nn.Module, Tensors, dict[str, Any]]:
    """The PatchGAN of `prefix.main.*` onto uvq's discriminator (`--with-disc`)."""
    from uvq.config import DiscriminatorConfig
    from uvq.registry import registry

    convs = sorted({int(m.group(1)) for k in p if (m := re.match(re.escape(prefix) + r"main\.(\d+)\.weight$", k))
                    and p[k].ndim == 4})
    if not convs:
        raise UserError(f"--with-disc: {path} has no discriminator weights under {prefix}main.*")
    ndf = int(p[f"{prefix}main.{convs[0]}.weight"].shape[0])
    cfg = DiscriminatorConfig(ndf=ndf, n_layers=len(convs) - 2)
    model = registry.get("discriminators", cfg.name)(cfg)
    m = KeyMap()
    for key, value in p.items():
        if key.startswith(prefix):
            m.put(key[len(prefix):], value, key)
    return model, _finish(m, model, "discriminator", path), _asdict(cfg)


__all__ = ["load_tensor_file", "detect_layout", "infer_official_vqgan", "infer_taming_vqgan", "infer_official_prior",
           "map_official_vqgan", "map_taming_vqgan", "map_official_prior", "check_against_preset", "preset_configs",
           "KeyMap", "Tensors", "PRESETS"]
