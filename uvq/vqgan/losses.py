"""Stage one losses (docs/method.md section 1: Eq. 5 and Eq. 9), as callables apart from the VQGAN.

The generator (encoder, codebook, decoder) minimises

    L = L_rec + L_codebook + lambda * L_GAN
    L_rec      = l1_weight * |x - x_hat|_1 + w_p * LPIPS(x, x_hat)              (Eq. 5, means)
    L_codebook = ||sg[E(x)] - z_q||^2 + beta * ||sg[z_q] - E(x)||^2             ("paper", Eq. 5)
              or ||sg[z_q] - E(x)||^2 + beta * ||z_q - sg[E(x)]||^2             ("legacy", default)
    L_GAN      = -mean(D(DiffAugment(x_hat)))                                   (hinge, generator side)
    lambda     = min(||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta), lambda_max), detached,
                 and 0 before disc_start_step                                   (Eq. 9)

and the PatchGAN discriminator D minimises the hinge loss
0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))).

LPIPS runs offline: its trunk weights are torchvision's ImageNet files in the torch hub cache,
loaded here with `torch.load(weights_only=True)`; when they are missing, a UserError says which
file to put where (see `lpips_trunk_path`).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from uvq.config import VQGANTrainConfig
from uvq.runtime import UserError

# ---------------------------------------------------------------------------------------------
# LPIPS offline (Zhang et al. 2018; the `lpips` package)
# ---------------------------------------------------------------------------------------------

# LPIPS trunk -> torchvision architecture and the ImageNet weights file that torchvision caches.
# The 8 hex digits in each name are the sha256 prefix that torchvision checks after a download.
LPIPS_TRUNKS = {
    "vgg": ("vgg16", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "squeeze": ("squeezenet1_1", "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
}


def lpips_trunk_path(net: str = "vgg") -> Path:
    """Where torchvision keeps (and LPIPS reads) the trunk weights: $TORCH_HOME/hub/checkpoints/<file>.

    TORCH_HOME defaults to ~/.cache/torch (torch.hub.get_dir() resolves it, $XDG_CACHE_HOME too).
    """
    if net not in LPIPS_TRUNKS:
        raise UserError(f"unknown LPIPS net {net!r}; valid: {', '.join(LPIPS_TRUNKS)}")
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(LPIPS_TRUNKS[net][1])


def _sha256_prefix_ok(path: Path) -> bool:
    expected = path.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest().startswith(expected)


def load_lpips(net: str = "vgg", check_hash: bool = False,
               alternative: str = "or set train.perceptual_weight=0 to train without LPIPS") -> nn.Module:
    """The `lpips` package's LPIPS(net, v0.1) with its trunk loaded from the torch hub cache.

    torchvision would load the same cached file with `torch.load(weights_only=False)` (it only
    checks the hash while downloading, never for a file already in the cache), and would try to
    download it when it is absent. We read that file ourselves with weights_only=True, fail with
    one clear line when it is missing or wrong, and copy the trunk's `features.*` tensors into
    LPIPS's slices; LPIPS's own linear layers ship inside the lpips package. `check_hash`
    verifies the file against the sha256 prefix in its name (one full read of the file).
    `alternative` ends the error message with the caller's way around the missing weights.
    """
    import lpips

    path = lpips_trunk_path(net)
    arch, url = LPIPS_TRUNKS[net]
    zero = alternative
    if not path.is_file():
        raise UserError(f"LPIPS-{net} needs torchvision's ImageNet {arch} weights: put {path.name} (from {url}) "
                        f"at {path} (the torch hub cache, $TORCH_HOME/hub/checkpoints), {zero}")
    if check_hash and not _sha256_prefix_ok(path):
        raise UserError(f"{path} does not match the sha256 prefix in its name; replace it with {url}, {zero}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} is not a readable {arch} weights file ({type(exc).__name__}); "
                        f"replace it with {url}, {zero}") from exc
    with warnings.catch_warnings():  # torchvision's deprecation notes about `pretrained=False`
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    try:
        # lpips keeps torchvision's `features[i]` modules under their index in slice1..sliceN
        for part in model.net.children():
            for index, module in part.named_children():
                own = module.state_dict()
                module.load_state_dict({k: state[f"features.{index}.{k}"] for k in own}, strict=True)
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"{path} does not hold {arch} weights ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                        f"replace it with {url}, {zero}") from exc
    return model.eval().requires_grad_(False)


class Perceptual(nn.Module):
    """LPIPS distance of images in [0,1], per image: ([B,3,H,W], [B,3,H,W]) -> [B].

    The LPIPS network stays frozen and in eval mode even when its owner is put in train mode
    (its linear layers carry dropout that would otherwise make the loss random).
    """

    def __init__(self, lpips_model: nn.Module) -> None:
        super().__init__()
        self.lpips = lpips_model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> Perceptual:
        super().train(mode)
        self.lpips.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # LPIPS expects [-1,1]
        return self.lpips(x * 2.0 - 1.0, y * 2.0 - 1.0).flatten()  # [B,1,1,1] -> [B]


# ---------------------------------------------------------------------------------------------
# Reconstruction loss L_rec (Eq. 5)
# ---------------------------------------------------------------------------------------------


class ReconstructionLoss(nn.Module):
    """L_rec = l1_weight * mean|x - x_hat| + perceptual_weight * mean LPIPS(x, x_hat).

    forward(x, x_hat) -> (loss, parts) with parts {"l1", "perceptual"} (detached means). Without a
    perceptual module (perceptual_weight 0) the LPIPS term is absent and needs no weights.
    """

    def __init__(self, l1_weight: float = 1.0, perceptual_weight: float = 1.0,
                 perceptual: nn.Module | None = None) -> None:
        super().__init__()
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual module (see load_lpips)")
        self.l1_weight = l1_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual = perceptual if perceptual_weight > 0 else None

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        l1 = (x - x_hat).abs().mean()
        loss = self.l1_weight * l1
        parts = {"l1": l1.detach()}
        if self.perceptual is not None:
            p = self.perceptual(x, x_hat).mean()
            loss = loss + self.perceptual_weight * p
            parts["perceptual"] = p.detach()
        return loss, parts


def build_l1_lpips(cfg: VQGANTrainConfig) -> ReconstructionLoss:
    """L1 + w_p * LPIPS(train.lpips_net); LPIPS is loaded only when train.perceptual_weight > 0."""
    perceptual = Perceptual(load_lpips(cfg.lpips_net)) if cfg.perceptual_weight > 0 else None
    return ReconstructionLoss(cfg.l1_weight, cfg.perceptual_weight, perceptual)


# ---------------------------------------------------------------------------------------------
# Codebook and commitment terms (Eq. 5; both placements of beta)
# ---------------------------------------------------------------------------------------------


def codebook_loss(qinfo: dict[str, torch.Tensor], beta: float = 0.25, placement: str = "legacy") -> torch.Tensor:
    """Combine the quantizer's two unweighted terms.

    qinfo["codebook_loss"] = mean((z_q - sg[z])^2) moves the codebook; qinfo["commit_loss"] =
    mean((sg[z_q] - z)^2) moves the encoder.
    - "paper" (Eq. 5): codebook + beta * commit.
    - "legacy" (the authors' and taming's code, the default): commit + beta * codebook,
      i.e. mean((sg[z_q]-z)^2) + beta * mean((z_q-sg[z])^2).
    """
    if placement == "legacy":
        return qinfo["commit_loss"] + beta * qinfo["codebook_loss"]
    if placement == "paper":
        return qinfo["codebook_loss"] + beta * qinfo["commit_loss"]
    raise ValueError(f"beta placement must be 'legacy' or 'paper', got {placement!r}")


class CodebookLoss:
    """`codebook_loss` with its beta and placement bound: CodebookLoss(...)(qinfo) -> scalar."""

    def __init__(self, beta: float = 0.25, placement: str = "legacy", weight: float = 1.0) -> None:
        if placement not in ("legacy", "paper"):
            raise ValueError(f"beta placement must be 'legacy' or 'paper', got {placement!r}")
        self.beta, self.placement, self.weight = beta, placement, weight

    def __call__(self, qinfo: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.weight * codebook_loss(qinfo, self.beta, self.placement)


def build_vq_codebook(cfg: VQGANTrainConfig) -> CodebookLoss:
    """Codebook + commitment terms with train.beta, train.beta_placement and train.codebook_weight."""
    return CodebookLoss(cfg.beta, cfg.beta_placement, cfg.codebook_weight)


# ---------------------------------------------------------------------------------------------
# Adversarial losses and the adaptive weight (Eq. 9)
# ---------------------------------------------------------------------------------------------


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean(D(x_hat)), the generator side of the official code."""
    return -logits_fake.mean()


class HingeGANLoss:
    """The pair of adversarial losses: `.d_loss(real, fake)` and `.g_loss(fake)` on logits."""

    d_loss = staticmethod(hinge_d_loss)
    g_loss = staticmethod(hinge_g_loss)


def build_hinge(cfg: VQGANTrainConfig | None = None) -> HingeGANLoss:
    """Hinge loss for D, -mean(D(x_hat)) for G (the authors' code)."""
    return HingeGANLoss()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    lambda_max: float = 1.0, delta: float = 1e-4) -> torch.Tensor:
    """lambda = min(||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta), lambda_max), detached.

    G_L is the decoder's last conv weight (VQGAN.last_layer). The graphs are kept, so the caller
    can still backpropagate both losses. The clamp is the paper's (Eq. 9); the authors' code
    instead clamps at 1e4 and then multiplies by its `disc_weight_max`.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    ratio = g_rec.norm() / (g_gan.norm() + delta)
    return ratio.clamp(max=lambda_max).detach()


def disc_factor(step: int, disc_start_step: int) -> float:
    """1 from `disc_start_step` on, 0 before: lambda and D's training are off until then."""
    return 0.0 if step < disc_start_step else 1.0
