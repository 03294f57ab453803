"""Stage one: the VQGAN autoencoder (docs/method.md section 1; paper sections 3.1 and 3.4).

An encoder E maps an image x in [0,1]^{3xHxW} to a grid of vectors E(x) in R^{Dxhxw}; a quantizer
replaces each vector by its nearest codebook entry e_k; a decoder G maps the quantized grid back
to an image. The codes k form the token grid that the absorbing prior (stage two) models.

Two variants of the same computation are expressible with these modules:

- "official": samb-t/unleashing-transformers. No swish before the final convs, no
  quant_conv / post_quant_conv, `res_blocks` decoder blocks per level, images in [0,1].
- "taming": CompVis/taming-transformers' VQModel. Swish before both final convs, a 1x1
  quant_conv (z_channels -> D) and post_quant_conv (D -> z_channels), `res_blocks + 1` decoder
  blocks per level, and the networks work on [-1,1] (the VQGAN converts internally, so that its
  public API always takes and returns [0,1]).

State-dict layout: `encoder.blocks.<i>` and `decoder.blocks.<i>` are flat ModuleLists in
construction order, exactly as the authors' Encoder/Generator, so that an official checkpoint
loads by renaming `ae.encoder.` -> `encoder.`, `ae.generator.` -> `decoder.`,
`ae.quantize.` -> `quantize.`. The one difference: the authors' ResBlock always owns a 1x1
`conv_out` but only uses it when the channel count changes; ours owns it only then, so the
importer drops the never-used tensors of same-width blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from uvq.config import VQGANConfig
from uvq.registry import register, registry

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6, the normalisation of both reference codes."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


# ---------------------------------------------------------------------------------------------
# Blocks (docs/method.md section 1: "GroupNorm, swish, conv3x3, GroupNorm, swish, conv3x3, plus a 1x1 shortcut")
# ---------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Pre-activation residual block; a 1x1 `conv_out` shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.conv_out = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))  # [B,Cin,H,W] -> [B,Cout,H,W]
        h = self.conv2(swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.conv_out(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1-conv projections (both codes)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B,C,H,W] -> [B,1,HW,C]: one head whose scale 1/sqrt(C) is SDPA's default, as in both codes
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(hn), self.k(hn), self.v(hn)))
        a = F.scaled_dot_product_attention(q, k, v)  # [B,1,HW,C]
        a = a.transpose(2, 3).reshape(b, c, h, w)  # [B,C,H,W]
        return x + self.proj_out(a)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding of one pixel on the right and bottom only.

    The asymmetric padding is the reference codes' (taming's Downsample(with_conv=True)); a
    symmetric padding=1 would shift the sampling grid by half a pixel.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # [B,C,H,W] -> [B,C,H/2,W/2]


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B,C,H,W] -> [B,C,2H,2W]


# ---------------------------------------------------------------------------------------------
# Encoder E and decoder G (docs/method.md section 1)
# ---------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """conv_in; per level `res_blocks` ResBlocks (each followed by attention at the attention
    resolutions) and a Downsample except at the last level; mid (res, attn, res); GroupNorm;
    [swish, taming only]; conv3x3 to `out_channels`.

    [B,in_channels,R,R] -> [B,out_channels,R/2^(L-1),R/2^(L-1)] with L = len(ch_mult).
    """

    def __init__(self, in_channels: int, nf: int, ch_mult: list[int], res_blocks: int, resolution: int,
                 attn_resolutions: list[int], out_channels: int, final_swish: bool = False) -> None:
        super().__init__()
        self.final_swish = final_swish
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, nf, kernel_size=3, stride=1, padding=1)]
        ch, res = nf, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(res_blocks):
                blocks.append(ResBlock(ch, nf * mult))
                ch = nf * mult
                if res in attn_resolutions:
                    blocks.append(AttnBlock(ch))
            if level != len(ch_mult) - 1:
                blocks.append(Downsample(ch))
                res //= 2
        blocks += [ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch)]
        blocks += [Normalize(ch), nn.Conv2d(ch, out_channels, kernel_size=3, stride=1, padding=1)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks[:-1]:
            x = block(x)
        if self.final_swish:
            x = swish(x)
        return self.blocks[-1](x)


def _likelihood_head(ch: int, out_channels: int) -> nn.Sequential:
    """The official `logsigma` head: conv3x3, ReLU, conv1x1 to one log-std per output channel."""
    return nn.Sequential(
        nn.Conv2d(ch, ch, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(ch, out_channels, kernel_size=1, stride=1, padding=0),
    )


class Decoder(nn.Module):
    """The authors' Generator: conv_in; mid (res, attn, res); per level, from the coarsest,
    `res_blocks` ResBlocks (each followed by attention at the attention resolutions) and an
    Upsample except at the finest level; GroupNorm; [swish, taming only]; conv3x3 to
    `out_channels`.

    [B,in_channels,h,w] -> [B,out_channels,h*2^(L-1),w*2^(L-1)].

    `likelihood_head` adds the official `logsigma` head (conv3x3, ReLU, conv1x1) on the
    features before the last conv: a per-pixel Gaussian log-std for likelihoods (docs/method.md section 6),
    fine-tuned after training in the authors' code. Off by default.
    """

    def __init__(self, in_channels: int, nf: int, ch_mult: list[int], res_blocks: int, resolution: int,
                 attn_resolutions: list[int], out_channels: int, final_swish: bool = False,
                 likelihood_head: bool = False) -> None:
        super().__init__()
        self.final_swish = final_swish
        ch = nf * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)]
        blocks += [ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch)]
        for level in reversed(range(len(ch_mult))):
            for _ in range(res_blocks):
                blocks.append(ResBlock(ch, nf * ch_mult[level]))
                ch = nf * ch_mult[level]
                if res in attn_resolutions:
                    blocks.append(AttnBlock(ch))
            if level != 0:
                blocks.append(Upsample(ch))
                res *= 2
        blocks += [Normalize(ch), nn.Conv2d(ch, out_channels, kernel_size=3, stride=1, padding=1)]
        self.blocks = nn.ModuleList(blocks)
        if likelihood_head:
            self.logsigma = _likelihood_head(ch, out_channels)

    def add_likelihood_head(self) -> nn.Module:
        """Give a decoder built without it a fresh `logsigma` head (for `uvq eval bpd`); returns the head.

        Its last conv starts at zero weight, so the log-std starts as the bias alone (set from the
        data by the fine-tuning, uvq.evaluation.bpd); a decoder that has a head keeps it.
        """
        if not hasattr(self, "logsigma"):
            ch, out = self.blocks[-1].in_channels, self.blocks[-1].out_channels
            head = _likelihood_head(ch, out).to(self.blocks[-1].weight.device)
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)
            self.logsigma = head
        return self.logsigma

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """Everything up to the last conv: [B,in_channels,h,w] -> [B,nf*ch_mult[0],H,W]."""
        for block in self.blocks[:-1]:
            z = block(z)
        return swish(z) if self.final_swish else z

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks[-1](self.features(z))

    def probabilistic(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean image, log-std) of the likelihood head; needs `likelihood_head=True`."""
        if not hasattr(self, "logsigma"):
            raise ValueError("this decoder has no likelihood head (build it with likelihood_head=True)")
        h = self.features(z)
        return self.blocks[-1](h), self.logsigma(h)


# ---------------------------------------------------------------------------------------------
# Quantizer (docs/method.md section 1: nearest code, straight-through gradients; Eq. 5's two terms)
# ---------------------------------------------------------------------------------------------


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """Codebook perplexity exp(H(p)) of code counts [K], p = counts / sum: K when the codes are used
    uniformly, 1 when one code is (the one definition, used by training and evaluation alike)."""
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-torch.special.xlogy(p, p).sum())


class NearestQuantizer(nn.Module):
    """Codebook e in R^{KxD}: each vector becomes its nearest entry by squared distance.

    forward(z [B,D,h,w]) -> (z_q [B,D,h,w], codes [B,h,w], qinfo) where the returned z_q is the
    straight-through estimate z + sg[e_k - z] (its gradient flows to z unchanged) and qinfo holds
    the two unweighted terms of Eq. 5 and code usage:

    - `codebook_loss` = mean((e_k - sg[z])^2): moves the codebook (gradient to e only);
    - `commit_loss`   = mean((sg[e_k] - z)^2): commits the encoder (gradient to z only);
    - `usage`: fraction of the K codes used in the batch;
    - `perplexity`: exp of the entropy of the batch's code histogram (K when uniform).

    Both losses have the same value; only their gradients differ. Where beta goes is decided by
    the loss (uvq.vqgan.losses.codebook_loss), not here.
    """

    def __init__(self, codebook_size: int, emb_dim: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.emb_dim = emb_dim
        self.embedding = nn.Embedding(codebook_size, emb_dim)
        # init as both reference codes (taming's VectorQuantizer)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Codes of the nearest entries: [B,D,h,w] -> LongTensor[B,h,w]."""
        b, d, h, w = z.shape
        # fp32 distances even under autocast: bf16 ||z||^2 - 2 z.e would reorder near ties
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # [BHW,D]
            e = self.embedding.weight.float()  # [K,D]
            # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, as both reference codes compute it
            dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2.0 * flat @ e.t()  # [BHW,K]
            return dist.argmin(dim=1).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook entries of a code grid: LongTensor[B,h,w] -> [B,D,h,w]."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()

    def usage_stats(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        counts = torch.bincount(codes.reshape(-1), minlength=self.codebook_size).float()
        return {"usage": (counts > 0).float().mean(), "perplexity": perplexity(counts)}

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        codes = self.nearest(z)  # [B,h,w]
        e_k = self.lookup(codes)  # [B,D,h,w], fp32 codebook entries
        zf = z.float()
        qinfo = {
            "codebook_loss": (e_k - zf.detach()).pow(2).mean(),
            "commit_loss": (e_k.detach() - zf).pow(2).mean(),
        }
        with torch.no_grad():
            qinfo.update(self.usage_stats(codes))
        z_q = z + (e_k.to(z.dtype) - z).detach()  # straight-through: z + sg[e_k - z]
        return z_q, codes, qinfo


# ---------------------------------------------------------------------------------------------
# The VQGAN: image <-> codes, the one place
# ---------------------------------------------------------------------------------------------


class VQGAN(nn.Module):
    """Encoder, quantizer and decoder, with a public API on images in [0,1] (never clamped).

    - forward(x) -> (reconstruction, codes [B,h,w], qinfo)
    - encode(x) -> (z_q, codes, qinfo); encode_codes(x) -> LongTensor[B,h,w]
    - decode(z_q) -> images; decode_codes(codes) -> images (tokens to image: the only path)

    `signed_io` (taming) makes the networks see 2x-1 and maps their output back by (y+1)/2.
    `quant_conv` / `post_quant_conv` (taming) sit between the encoder / decoder and the codebook.
    """

    def __init__(self, encoder: Encoder, quantize: NearestQuantizer, decoder: Decoder,
                 latent_shape: tuple[int, int], quant_conv: nn.Module | None = None,
                 post_quant_conv: nn.Module | None = None, signed_io: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.quantize = quantize
        self.decoder = decoder
        self.quant_conv = quant_conv
        self.post_quant_conv = post_quant_conv
        self.signed_io = signed_io
        self.latent_shape = tuple(latent_shape)

    @property
    def codebook_size(self) -> int:
        return self.quantize.codebook_size

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final conv, G_L of the adaptive weight (Eq. 9)."""
        return self.decoder.blocks[-1].weight

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x * 2.0 - 1.0 if self.signed_io else x)
        return self.quant_conv(z) if self.quant_conv is not None else z

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """[B,3,H,W] in [0,1] -> (z_q [B,D,h,w] straight-through, codes [B,h,w], qinfo)."""
        return self.quantize(self._pre(x))

    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> LongTensor[B,h,w]."""
        return self.quantize.nearest(self._pre(x))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """[B,D,h,w] -> [B,3,H,W], nominally in [0,1] (not clamped)."""
        if self.post_quant_conv is not None:
            z_q = self.post_quant_conv(z_q)
        y = self.decoder(z_q)
        return (y + 1.0) * 0.5 if self.signed_io else y

    def decode_gaussian(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LongTensor[B,h,w] -> (mean [B,3,H,W] in the [0,1] image scale, log-std [B,3,H,W] in that scale).

        The decoder's likelihood head (docs/method.md section 6); with `signed_io` the network's [-1,1] scale is
        halved into [0,1], so the log-std drops by log 2.
        """
        z_q = self.quantize.lookup(codes)
        if self.post_quant_conv is not None:
            z_q = self.post_quant_conv(z_q)
        mean, log_std = self.decoder.probabilistic(z_q)
        if self.signed_io:
            return (mean + 1.0) * 0.5, log_std - math.log(2.0)
        return mean, log_std

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """LongTensor[B,h,w] -> [B,3,H,W] through the codebook entries."""
        return self.decode(self.quantize.lookup(codes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        z_q, codes, qinfo = self.encode(x)
        return self.decode(z_q), codes, qinfo


# ---------------------------------------------------------------------------------------------
# Registry builders (the only functions here that read a config)
# ---------------------------------------------------------------------------------------------


def _latent_channels(cfg: VQGANConfig) -> int:
    """Channels at the encoder output / decoder input: z_channels (taming) or D (official)."""
    return cfg.z_channels if (cfg.variant == "taming" and cfg.z_channels is not None) else cfg.emb_dim


@register("encoders", "vqgan_encoder.v1")
def build_vqgan_encoder(cfg: VQGANConfig) -> Encoder:
    return Encoder(in_channels=cfg.in_channels, nf=cfg.nf, ch_mult=list(cfg.ch_mult), res_blocks=cfg.res_blocks,
                   resolution=cfg.img_size, attn_resolutions=list(cfg.attn_resolutions),
                   out_channels=_latent_channels(cfg), final_swish=cfg.variant == "taming")


@register("decoders", "vqgan_decoder.v1")
def build_vqgan_decoder(cfg: VQGANConfig) -> Decoder:
    return Decoder(in_channels=_latent_channels(cfg), nf=cfg.nf, ch_mult=list(cfg.ch_mult),
                   res_blocks=cfg.decoder_res_blocks, resolution=cfg.img_size,
                   attn_resolutions=list(cfg.attn_resolutions), out_channels=cfg.in_channels,
                   final_swish=cfg.variant == "taming", likelihood_head=cfg.likelihood_head)


@register("quantizers", "nearest.v1")
def build_nearest_quantizer(cfg: VQGANConfig) -> NearestQuantizer:
    return NearestQuantizer(codebook_size=cfg.codebook_size, emb_dim=cfg.emb_dim)


def build_vqgan(cfg: VQGANConfig) -> VQGAN:
    """The VQGAN of a config section, its parts built through the registry."""
    encoder = registry.get("encoders", cfg.encoder)(cfg)
    decoder = registry.get("decoders", cfg.decoder)(cfg)
    quantize = registry.get("quantizers", cfg.quantizer)(cfg)
    quant_conv = post_quant_conv = None
    if cfg.variant == "taming":
        z_ch = _latent_channels(cfg)
        quant_conv = nn.Conv2d(z_ch, cfg.emb_dim, kernel_size=1)
        post_quant_conv = nn.Conv2d(cfg.emb_dim, z_ch, kernel_size=1)
    return VQGAN(encoder, quantize, decoder, latent_shape=cfg.latent_shape, quant_conv=quant_conv,
                 post_quant_conv=post_quant_conv, signed_io=cfg.variant == "taming")
