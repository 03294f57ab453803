"""uvq.vqgan.losses: Eq. 5 and Eq. 9 against hand computations, and LPIPS's offline loading path.

LPIPS stand-in: the real trunk files are big (VGG16 528 MB, AlexNet 233 MB: torchvision builds and
loads the whole classifier too), SqueezeNet 1.1 is 5 MB. A randomly initialised squeezenet1_1
state dict, saved under the exact name torchvision caches it as, exercises the same loading path
as VGG (the file in $TORCH_HOME/hub/checkpoints, the `features.*` copy into lpips's slices, and
lpips's shipped linear layers). VGG's missing-file error needs no file at all.
"""

from __future__ import annotations

import lpips
import pytest
import torch
import torchvision

from uvq.config import DiscriminatorConfig, VQGANTrainConfig
from uvq.registry import registry
from uvq.runtime import UserError
from uvq.vqgan.discriminator import PatchDiscriminator
from uvq.vqgan.losses import (
    CodebookLoss,
    ReconstructionLoss,
    adaptive_weight,
    build_hinge,
    build_l1_lpips,
    build_vq_codebook,
    codebook_loss,
    disc_factor,
    hinge_d_loss,
    hinge_g_loss,
    load_lpips,
    lpips_trunk_path,
)
from uvq.vqgan.model import NearestQuantizer

# lpips's own reference path calls torchvision with the deprecated `pretrained=` argument
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated since 0.13.*:UserWarning")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return tmp_path / "torch"


@pytest.fixture
def squeeze_standin(torch_home):
    path = lpips_trunk_path("squeeze")
    assert path == torch_home / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------------
# LPIPS offline
# ---------------------------------------------------------------------------------------------


def test_lpips_loads_the_cached_trunk_like_torchvision_would(squeeze_standin):
    ours = load_lpips("squeeze")
    assert not any(p.requires_grad for p in ours.parameters())
    # lpips's own path: torchvision finds the same cached file (no download) and loads it
    reference = lpips.LPIPS(net="squeeze", pretrained=True, pnet_rand=False, verbose=False).eval()
    torch.manual_seed(1)
    x, y = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), reference(x, y))
        assert not torch.allclose(ours(x, y), lpips.LPIPS(net="squeeze", pnet_rand=True, verbose=False).eval()(x, y))


def test_missing_vgg_weights_say_which_file_goes_where(torch_home):
    with pytest.raises(UserError) as err:
        load_lpips("vgg")
    message = str(err.value)
    expected = torch_home / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert str(expected) in message and "vgg16-397923af.pth" in message
    assert "train.perceptual_weight=0" in message and "\n" not in message
    with pytest.raises(UserError, match="vgg16-397923af.pth"):
        build_l1_lpips(VQGANTrainConfig())


def test_wrong_or_corrupt_trunk_files_are_user_errors(squeeze_standin):
    with pytest.raises(UserError, match="sha256"):
        load_lpips("squeeze", check_hash=True)  # a stand-in is not the published file
    torch.save({"features.0.weight": torch.zeros(1)}, squeeze_standin)
    with pytest.raises(UserError, match="does not hold squeezenet1_1 weights"):
        load_lpips("squeeze")
    squeeze_standin.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable"):
        load_lpips("squeeze")


def test_perceptual_weight_zero_needs_no_weights(torch_home):
    loss = build_l1_lpips(VQGANTrainConfig(perceptual_weight=0.0, l1_weight=2.0))
    x, y = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.25)
    value, parts = loss(x, y)
    assert value.item() == pytest.approx(0.5) and set(parts) == {"l1"}


def test_l1_plus_lpips_composition(squeeze_standin):
    loss = build_l1_lpips(VQGANTrainConfig(lpips_net="squeeze", perceptual_weight=0.7, l1_weight=1.5))
    loss.train()  # LPIPS stays in eval: its dropout must not make the loss random
    assert not loss.perceptual.lpips.training
    torch.manual_seed(2)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32, requires_grad=True)
    value, parts = loss(x, y)
    reference = lpips.LPIPS(net="squeeze", pnet_rand=False, verbose=False).eval()
    p = reference(x * 2 - 1, y * 2 - 1).mean()  # LPIPS expects [-1,1]
    expected = 1.5 * (x - y).abs().mean() + 0.7 * p
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(parts["perceptual"], p.detach())
    torch.testing.assert_close(value, loss(x, y)[0])  # deterministic
    value.backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()


def test_reconstruction_loss_requires_a_perceptual_module_when_weighted():
    with pytest.raises(ValueError):
        ReconstructionLoss(perceptual_weight=1.0, perceptual=None)


# ---------------------------------------------------------------------------------------------
# Codebook terms: both placements of beta (Eq. 5 and the official code)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["legacy", "paper"])
def test_beta_placement_by_hand(placement):
    torch.manual_seed(3)
    beta = 0.25
    q = NearestQuantizer(codebook_size=5, emb_dim=2)
    torch.nn.init.normal_(q.embedding.weight)
    z = torch.randn(1, 2, 1, 3, requires_grad=True)  # 3 vectors of dimension 2
    _, codes, qinfo = q(z)
    loss = codebook_loss(qinfo, beta=beta, placement=placement)
    e = q.embedding.weight.detach()[codes.flatten()]  # [3,2]
    zf = z.detach()[0, :, 0, :].t()  # [3,2]
    mse = ((e - zf) ** 2).mean()
    w_commit, w_book = (1.0, beta) if placement == "legacy" else (beta, 1.0)
    torch.testing.assert_close(loss, (w_commit + w_book) * mse)
    loss.backward()
    # d/dz: w_commit * 2(z - e)/n ; d/de_k: w_book * sum over its vectors of 2(e - z)/n
    torch.testing.assert_close(z.grad[0, :, 0, :].t(), w_commit * 2 * (zf - e) / 6)
    grad_e = torch.zeros(5, 2)
    for n, k in enumerate(codes.flatten().tolist()):
        grad_e[k] += w_book * 2 * (e[n] - zf[n]) / 6
    torch.testing.assert_close(q.embedding.weight.grad, grad_e)


def test_codebook_loss_object_and_bad_placement():
    qinfo = {"codebook_loss": torch.tensor(2.0), "commit_loss": torch.tensor(3.0)}
    assert CodebookLoss(0.25, "legacy", weight=2.0)(qinfo).item() == pytest.approx(2 * (3.0 + 0.5))
    assert build_vq_codebook(VQGANTrainConfig(beta_placement="paper"))(qinfo).item() == pytest.approx(2.75)
    with pytest.raises(ValueError):
        codebook_loss(qinfo, placement="other")


# ---------------------------------------------------------------------------------------------
# Adversarial losses, adaptive weight, discriminator
# ---------------------------------------------------------------------------------------------


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.5, 3.0])  # relu(1 + f) = 0, 1, 2.5, 4
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 7.5 / 4))
    assert hinge_g_loss(fake).item() == pytest.approx(-2.5 / 4)
    gan = build_hinge(VQGANTrainConfig())
    assert gan.d_loss(real, fake).item() == pytest.approx(hinge_d_loss(real, fake).item())


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    torch.manual_seed(4)
    layer = torch.nn.Conv2d(4, 3, 3, padding=1)
    features = torch.randn(2, 4, 6, 6)
    out = layer(features)
    rec = (out - torch.rand_like(out)).abs().mean()
    gan = -(out * torch.randn_like(out)).mean()
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, layer.weight, retain_graph=True)[0]
    ratio = (g_rec.norm() / (g_gan.norm() + 1e-4)).item()
    w = adaptive_weight(rec, gan, layer.weight, lambda_max=1e9)
    assert w.item() == pytest.approx(ratio, rel=1e-5) and not w.requires_grad
    clamped = adaptive_weight(rec, gan, layer.weight, lambda_max=ratio / 2)
    assert clamped.item() == pytest.approx(ratio / 2)
    (rec + w * gan).backward()  # both graphs survive for the real backward pass


def test_adaptive_weight_closed_form_for_a_linear_last_layer():
    # y = W h: grad_W sum(a*y) = a h^T, so ||.|| = |a| |h|
    h = torch.tensor([3.0, 4.0])
    a, c = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([0.0, 0.6, 0.8])
    W = torch.randn(3, 2, requires_grad=True)
    y = W @ h
    w = adaptive_weight((a * y).sum(), (c * y).sum(), W, lambda_max=100.0, delta=0.5)
    assert w.item() == pytest.approx(3.0 * 5.0 / (1.0 * 5.0 + 0.5))


def test_disc_factor_starts_at_disc_start_step():
    assert disc_factor(0, 30001) == 0.0 and disc_factor(30000, 30001) == 0.0
    assert disc_factor(30001, 30001) == 1.0 and disc_factor(10**6, 30001) == 1.0


def test_patchgan_layout_matches_the_authors_discriminator(fixtures_dir):
    sd = torch.load(fixtures_dir / "official" / "vqgan_ema_small.th", weights_only=True)
    theirs = {k[len("disc."):]: v for k, v in sd.items() if k.startswith("disc.")}
    disc = registry.get("discriminators", "patchgan.v1")(DiscriminatorConfig(ndf=16, n_layers=2), in_channels=3)
    disc.load_state_dict(theirs, strict=True)
    assert disc(torch.rand(2, 3, 32, 32)).shape == (2, 1, 6, 6)


def test_patchgan_paper_size_and_init():
    disc = PatchDiscriminator(3, ndf=64, n_layers=3)
    # 4x4 convs 3->64 (bias), 64->128, 128->256, 256->512 (no bias, BatchNorm), 512->1 (bias)
    expected = (3 * 64 * 16 + 64) + sum(i * o * 16 + 2 * o for i, o in [(64, 128), (128, 256), (256, 512)]) + (512 * 16 + 1)
    assert sum(p.numel() for p in disc.parameters()) == expected == 2_765_633
    assert disc.to("meta")(torch.empty(1, 3, 256, 256, device="meta")).shape == (1, 1, 30, 30)
    bns = [m for m in PatchDiscriminator(3, 64, 3).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 3 and all(m.bias.abs().sum() == 0 for m in bns)
