"""The original layouts' forward passes, computed straight from foreign state dicts.

These are the references that `uvq import` verifies its conversions against: the authors'
VQGAN encoder/generator and transformer, and taming-transformers' Encoder/Decoder, reading the
original tensors by their original names, so that they share nothing with uvq's own modules
(`uvq.vqgan.model`, `uvq.prior.model`). The convolutional networks are written with
torch.nn.functional; the authors' transformer and sampling loops are modules written once here,
which the benchmarks and tests (uvq vs the authors' code) use as well.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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


# ---------------------------------------------------------------------------------------------
# The authors' transformer and sampling loop, written once
#
# From the authors' models/transformer.py (a minGPT-style bidirectional Transformer: separate
# key / query / value Linears, LayerNorm eps 1e-5, a 4x GELU MLP, no causal mask) and their
# sampler's loop in models/absorbing_diffusion.py (reveal each masked token with probability
# 1/t, then draw all of them from the network). The import verification, the benchmarks and
# the tests all use these.
# ---------------------------------------------------------------------------------------------


class AuthorsAttention(nn.Module):
    """Separate key / query / value Linears and attention written out, as the authors' layer."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.key, self.query, self.value = nn.Linear(n_embd, n_embd), nn.Linear(n_embd, n_embd), nn.Linear(n_embd, n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        hs = c // self.n_head
        k = self.key(x).view(b, n, self.n_head, hs).transpose(1, 2)  # [B,H,N,hs]
        q = self.query(x).view(b, n, self.n_head, hs).transpose(1, 2)
        v = self.value(x).view(b, n, self.n_head, hs).transpose(1, 2)
        att = torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs)), dim=-1)  # [B,H,N,N]
        y = (att @ v).transpose(1, 2).contiguous().view(b, n, c)  # [B,N,C]
        return self.proj(y)


class AuthorsBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = AuthorsAttention(n_embd, n_head)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class AuthorsTransformer(nn.Module):
    """The authors' Transformer: tokens [B,N] in 0..K (K = the mask) -> logits [B,N,K].

    Parameter names are the authors' (`_denoise_fn.` stripped), so their state dict loads as is.
    """

    def __init__(self, codebook_size: int, n_tokens: int, n_embd: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(codebook_size + 1, n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, n_tokens, n_embd))
        self.blocks = nn.Sequential(*[AuthorsBlock(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, codebook_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb[:, : idx.shape[1]]  # [B,N,C]
        return self.head(self.ln_f(self.blocks(x)))  # [B,N,K]


def official_transformer(p: Tensors, idx: torch.Tensor, n_head: int) -> torch.Tensor:
    """The authors' Transformer from their state dict (keys `_denoise_fn.*`): tokens [B,N] in
    0..K -> logits [B,N,K]."""
    pre = "_denoise_fn."
    sd = {k[len(pre):]: v for k, v in p.items() if k.startswith(pre)}
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    _, n_tokens, n_embd = sd["pos_emb"].shape
    with torch.device("meta"):  # no memory or random init for weights that are replaced at once
        net = AuthorsTransformer(sd["head.weight"].shape[0], n_tokens, n_embd, n_head, n_layer)
    # the authors' checkpoints hold more than the network (e.g. an unused `start_tok`): take its tensors
    net.load_state_dict({k: sd[k] for k in net.state_dict()}, strict=True, assign=True)
    with torch.no_grad():
        return net.eval()(idx)


def reference_from(prior: nn.Module, n_head: int) -> AuthorsTransformer:
    """The authors' network with the weights of uvq's prior (its fused qkv split back into three)."""
    c = prior.tok_emb.weight.shape[1]
    ref = AuthorsTransformer(prior.codebook_size, prior.n_tokens, c, n_head, len(prior.blocks))
    sd = {}
    for key, value in prior.state_dict().items():
        if ".attn.qkv." in key:
            for name, part in zip(("query", "key", "value"), value.chunk(3, 0), strict=True):
                sd[key.replace(".qkv.", f".{name}.")] = part
        else:
            sd[key] = value
    ref.load_state_dict(sd)
    return ref.to(prior.tok_emb.weight.device)


@torch.no_grad()
def authors_loop(net: nn.Module, x: torch.Tensor, *, mask_id: int, steps: int, temp: float,
                 uniform: Callable[[], torch.Tensor], t_start: int | None = None, max_steps: int | None = None,
                 amp: bool = False) -> tuple[torch.Tensor, int, int]:
    """The authors' loop from t = t_start (default `steps`) down to 1, the network on every step.

    Each step takes two uniform tensors [B,N] from `uniform()`: u_reveal reveals a masked token
    when u_reveal < 1/t (the authors' `changes`), u_value draws every token by the inverse CDF of
    softmax(logits / temp). Returns (tokens [B,N], steps run, (sample, step) pairs that revealed
    a token); stops after `max_steps` steps when given (the benchmark times a part of the chain).
    """
    x = x.clone()
    unmasked = x != mask_id
    run, reveal_rows = 0, torch.zeros((), dtype=torch.long, device=x.device)
    for t in range(t_start or steps, 0, -1):
        if max_steps is not None and run >= max_steps:
            break
        u_reveal, u_value = uniform(), uniform()
        changes = u_reveal < 1.0 / t
        changes = torch.bitwise_xor(changes, torch.bitwise_and(changes, unmasked))  # as the authors
        unmasked = torch.bitwise_or(unmasked, changes)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x)  # [B,N,K]
        reveal_rows += changes.any(1).sum()
        probs = (logits.float() / temp).double().softmax(-1)  # float64, as uvq's exact draw (docs/sampling.md)
        cdf = probs.cumsum(-1)
        x_0_hat = (cdf <= u_value.double()[..., None] * cdf[..., -1:]).sum(-1).clamp_max(probs.shape[-1] - 1)  # [B,N]
        x[changes] = x_0_hat[changes]
        run += 1
    return x, run, int(reveal_rows)


@torch.no_grad()
def authors_mlm_loop(net: nn.Module, x: torch.Tensor, *, mask_id: int, steps: int, temp: float, T: int,
                     uniform: Callable[[], torch.Tensor],
                     draw: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The authors' `sample_mlm` loop (models/absorbing_diffusion.py), the network on every step.

    For t in reversed(int(linspace(1, T, steps))): x_t = q_sample(x_0, t) masks each token with
    probability t/T, the network predicts x_0 from x_t, and every masked token of x_t takes a value
    drawn from softmax(logits / temp). Two uniform tensors [B,N] per step from `uniform()` stand
    for their torch.rand_like (the mask) and Categorical(...).sample() (`draw(logits[M,K], u[M])`,
    one uniform per token). One generalisation: positions of x that are known (not `mask_id`) are
    never masked, so the loop also fills a partly known grid; from an all-masked x it is theirs.
    """
    x_0 = x.clone()
    known = x != mask_id
    for t in reversed(np.linspace(1, T, num=steps).astype(np.int64)):
        u_mask, u_value = uniform(), uniform()
        x_t = x_0.clone()
        mask = u_mask < (float(t) / T)  # q_sample: masked with probability t / T
        x_t[mask & ~known] = mask_id
        x_0_logits = net(x_t).float() / temp  # [B,N,K]
        where = x_t == mask_id
        x_0[where] = draw(x_0_logits[where], u_value[where])
    return x_0
