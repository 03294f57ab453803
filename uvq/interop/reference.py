"""The original layouts' forward passes, computed straight from foreign state dicts.

These are the references that `uvq import` verifies its conversions against: the authors'
VQGAN encoder/generator and transformer, and taming-transformers' Encoder/Decoder, written with
torch.nn.functional only, reading the original tensors by their original names, so that they
share nothing with uvq's own modules (`uvq.vqgan.model`, `uvq.prior.model`).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# The original forward passes, computed from the original tensors (the verification reference)
#
# Written from the authors' models/vqgan.py and models/transformer.py (samb-t/
# unleashing-transformers) and taming-transformers' taming/modules/diffusionmodules/model.py and
# taming/modules/vqvae/quantize.py (VectorQuantizer2, legacy), with torch.nn.functional only.
# ---------------------------------------------------------------------------------------------


def _gn(x: torch.Tensor, p: Tensors, name: str) -> torch.Tensor:
    # GroupNorm(32, eps=1e-6) in both codes
    return F.group_norm(x, 32, p[name + ".weight"], p[name + ".bias"], eps=1e-6)


def _conv(x: torch.Tensor, p: Tensors, name: str, stride: int = 1, padding: int | None = None) -> torch.Tensor:
    w = p[name + ".weight"]
    pad = w.shape[-1] // 2 if padding is None else padding
    return F.conv2d(x, w, p.get(name + ".bias"), stride=stride, padding=pad)


def _ref_resblock(x: torch.Tensor, p: Tensors, name: str, shortcut: str) -> torch.Tensor:
    """norm1, swish, conv1, norm2, swish, conv2, plus x (through a 1x1 conv when widths differ)."""
    h = _conv(F.silu(_gn(x, p, name + ".norm1")), p, name + ".conv1")
    h = _conv(F.silu(_gn(h, p, name + ".norm2")), p, name + ".conv2")
    # the authors' ResBlock owns conv_out always but applies it only when the width changes
    if x.shape[1] != h.shape[1]:
        x = _conv(x, p, f"{name}.{shortcut}")
    return x + h


def _ref_attn(x: torch.Tensor, p: Tensors, name: str) -> torch.Tensor:
    """One head over the h*w positions: softmax(q^T k / sqrt(c)) applied to v, then proj_out."""
    b, c, hh, ww = x.shape
    hn = _gn(x, p, name + ".norm")
    q = _conv(hn, p, name + ".q").reshape(b, c, hh * ww)  # [B,C,HW]
    k = _conv(hn, p, name + ".k").reshape(b, c, hh * ww)
    v = _conv(hn, p, name + ".v").reshape(b, c, hh * ww)
    w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c ** -0.5, dim=2)  # [B,HW(q),HW(k)]
    h = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)
    return x + _conv(h, p, name + ".proj_out")


def _ref_down(x: torch.Tensor, p: Tensors, name: str) -> torch.Tensor:
    return _conv(F.pad(x, (0, 1, 0, 1)), p, name, stride=2, padding=0)  # pad right/bottom, stride 2


def _ref_up(x: torch.Tensor, p: Tensors, name: str) -> torch.Tensor:
    return _conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), p, name)


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Both codes' argmin of ||z||^2 + ||e||^2 - 2 z.e: [B,D,h,w] -> LongTensor[B,h,w]."""
    b, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
    return dist.argmin(1).view(b, h, w)


def lookup_codes(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return codebook[codes].permute(0, 3, 1, 2)  # [B,h,w] -> [B,D,h,w]


def official_blocks(p: Tensors, prefix: str) -> list[tuple[str, str]]:
    """(name, kind) of the flat `<prefix>.<i>` list; kind: conv, norm, res, attn or resample."""
    idx = sorted({int(m.group(1)) for k in p if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))})
    out = []
    for i in idx:
        name = f"{prefix}.{i}"
        if name + ".norm1.weight" in p:
            out.append((name, "res"))
        elif name + ".q.weight" in p:
            out.append((name, "attn"))
        elif name + ".conv.weight" in p:
            out.append((name, "resample"))
        elif name + ".weight" in p:
            out.append((name, "conv" if p[name + ".weight"].ndim == 4 else "norm"))
        else:
            out.append((name, "unknown"))
    return out


def official_encode(p: Tensors, x: torch.Tensor) -> torch.Tensor:
    """The authors' Encoder: images in [0,1] [B,3,H,W] -> E(x) [B,D,h,w] (no swish before the last conv)."""
    for name, kind in official_blocks(p, "ae.encoder.blocks"):
        if kind == "res":
            x = _ref_resblock(x, p, name, "conv_out")
        elif kind == "attn":
            x = _ref_attn(x, p, name)
        elif kind == "resample":
            x = _ref_down(x, p, name + ".conv")
        elif kind == "norm":
            x = _gn(x, p, name)
        else:
            x = _conv(x, p, name)
    return x


def official_decode(p: Tensors, z_q: torch.Tensor) -> torch.Tensor:
    """The authors' Generator: [B,D,h,w] -> images [B,3,H,W] (nominally [0,1])."""
    last = official_blocks(p, "ae.generator.blocks")[-1][0]
    return _conv(_official_features(p, z_q), p, last)


def official_logsigma(p: Tensors, z_q: torch.Tensor) -> torch.Tensor:
    """The authors' likelihood head (Generator.probabilistic): conv3x3, ReLU, conv1x1 on the
    features before the last conv -> per-pixel log-std [B,3,H,W]."""
    h = F.relu(_conv(_official_features(p, z_q), p, "ae.generator.logsigma.0"))
    return _conv(h, p, "ae.generator.logsigma.2")


def _official_features(p: Tensors, z_q: torch.Tensor) -> torch.Tensor:
    """Every generator block but the last conv."""
    for name, kind in official_blocks(p, "ae.generator.blocks")[:-1]:
        if kind == "res":
            z_q = _ref_resblock(z_q, p, name, "conv_out")
        elif kind == "attn":
            z_q = _ref_attn(z_q, p, name)
        elif kind == "resample":
            z_q = _ref_up(z_q, p, name + ".conv")
        elif kind == "norm":
            z_q = _gn(z_q, p, name)
        else:
            z_q = _conv(z_q, p, name)
    return z_q


def taming_levels(p: Tensors, prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for k in p if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))})


def _taming_mid(h: torch.Tensor, p: Tensors, pre: str) -> torch.Tensor:
    h = _ref_resblock(h, p, pre + ".mid.block_1", "nin_shortcut")
    h = _ref_attn(h, p, pre + ".mid.attn_1")
    return _ref_resblock(h, p, pre + ".mid.block_2", "nin_shortcut")


def taming_encode(p: Tensors, x: torch.Tensor) -> torch.Tensor:
    """taming's Encoder then quant_conv: images in [-1,1] -> [B,D,h,w]."""
    h = _conv(x, p, "encoder.conv_in")
    for i in taming_levels(p, "encoder.down"):
        pre = f"encoder.down.{i}"
        for j in taming_levels(p, pre + ".block"):
            h = _ref_resblock(h, p, f"{pre}.block.{j}", "nin_shortcut")
            if f"{pre}.attn.{j}.q.weight" in p:
                h = _ref_attn(h, p, f"{pre}.attn.{j}")
        if pre + ".downsample.conv.weight" in p:
            h = _ref_down(h, p, pre + ".downsample.conv")
    h = _taming_mid(h, p, "encoder")
    h = _conv(F.silu(_gn(h, p, "encoder.norm_out")), p, "encoder.conv_out")  # swish before the last conv
    return _conv(h, p, "quant_conv")


def taming_decode(p: Tensors, z_q: torch.Tensor) -> torch.Tensor:
    """post_quant_conv then taming's Decoder: [B,D,h,w] -> images in [-1,1]."""
    h = _conv(_conv(z_q, p, "post_quant_conv"), p, "decoder.conv_in")
    h = _taming_mid(h, p, "decoder")
    for i in reversed(taming_levels(p, "decoder.up")):
        pre = f"decoder.up.{i}"
        for j in taming_levels(p, pre + ".block"):
            h = _ref_resblock(h, p, f"{pre}.block.{j}", "nin_shortcut")
            if f"{pre}.attn.{j}.q.weight" in p:
                h = _ref_attn(h, p, f"{pre}.attn.{j}")
        if pre + ".upsample.conv.weight" in p:
            h = _ref_up(h, p, pre + ".upsample.conv")
    return _conv(F.silu(_gn(h, p, "decoder.norm_out")), p, "decoder.conv_out")


def official_transformer(p: Tensors, idx: torch.Tensor, n_head: int) -> torch.Tensor:
    """The authors' Transformer (bidirectional): tokens [B,N] in 0..K -> logits [B,N,K]."""
    pre = "_denoise_fn."

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, p[pre + name + ".weight"], p.get(pre + name + ".bias"))

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], p[pre + name + ".weight"], p[pre + name + ".bias"], eps=1e-5)

    x = p[pre + "tok_emb.weight"][idx] + p[pre + "pos_emb"][:, : idx.shape[1]]  # [B,N,C]
    b, n, c = x.shape
    layers = sorted({int(k.split(".")[2]) for k in p if k.startswith(pre + "blocks.")})
    for i in layers:
        blk = f"blocks.{i}"
        h = ln(x, blk + ".ln1")
        q, k, v = (lin(h, f"{blk}.attn.{t}").view(b, n, n_head, c // n_head).transpose(1, 2)
                   for t in ("query", "key", "value"))  # [B,H,N,C/H]
        att = torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1])), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, n, c)
        x = x + lin(y, blk + ".attn.proj")
        x = x + lin(F.gelu(lin(ln(x, blk + ".ln2"), blk + ".mlp.0")), blk + ".mlp.2")
    return lin(ln(x, "ln_f"), "head")
