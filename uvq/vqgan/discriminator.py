"""The PatchGAN discriminator of stage one (docs/method.md section 1; taming's NLayerDiscriminator, after pix2pix).
"""

from __future__ import annotations

import torch
from torch import nn

from uvq.config import DiscriminatorConfig
from uvq.registry import register

# ---------------------------------------------------------------------------------------------
# PatchGAN discriminator (docs/method.md section 1; taming's NLayerDiscriminator, after pix2pix)
# ---------------------------------------------------------------------------------------------


def _init_discriminator(m: nn.Module) -> None:
    # DCGAN-style init, as taming-transformers' weights_init (the authors' code reuses it)
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class PatchDiscriminator(nn.Module):
    """Conv4x4/2 + LeakyReLU, then n_layers-1 blocks of Conv4x4/2 (no bias) + BatchNorm +
    LeakyReLU doubling the width (at most 8 ndf), one such block at stride 1, and a stride-1
    Conv4x4 to one logit per patch. Keys `main.<i>` as both reference codes.

    [B,C,H,W] -> [B,1,H/2^n_layers - 2,W/2^n_layers - 2] (30x30 logits at 256x256, n_layers 3).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_discriminator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


@register("discriminators", "patchgan.v1")
def build_patchgan(cfg: DiscriminatorConfig, in_channels: int = 3) -> PatchDiscriminator:
    """PatchGAN with BatchNorm (model.discriminator.ndf, n_layers)."""
    return PatchDiscriminator(in_channels=in_channels, ndf=cfg.ndf, n_layers=cfg.n_layers)
