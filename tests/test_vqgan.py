"""uvq.vqgan.model: the stage-one network (docs/method.md section 1).

The strongest checks run the reference projects' own recorded computations: the parity fixtures
hold small random checkpoints of the authors' VQGAN and of taming-transformers' VQModel with
their inputs and outputs. Mapping their keys onto our modules (renames only, plus dropping the
authors' never-used shortcut convs) must reproduce codes and images.
"""

from __future__ import annotations

import pytest
import torch

from uvq.checkpoint import build_model
from uvq.config import ConfigError, VQGANConfig, load_config
from uvq.registry import registry
from uvq.vqgan.model import AttnBlock, Decoder, Encoder, NearestQuantizer, ResBlock, build_vqgan

OFFICIAL_SMALL = dict(img_size=32, nf=32, ch_mult=[1, 2], res_blocks=1, attn_resolutions=[16], emb_dim=32,
                      codebook_size=64)
TAMING_SMALL = dict(img_size=32, nf=32, ch_mult=[1, 2], res_blocks=1, attn_resolutions=[16], emb_dim=16,
                    z_channels=32, codebook_size=64, variant="taming")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# The reference computations (tests/fixtures, made with the original projects' code)
# ---------------------------------------------------------------------------------------------


def official_state(fixtures_dir):
    sd = torch.load(fixtures_dir / "official" / "vqgan_ema_small.th", weights_only=True)
    renames = {"ae.encoder.": "encoder.", "ae.generator.": "decoder.", "ae.quantize.": "quantize."}
    out = {}
    for key, value in sd.items():
        for old, new in renames.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
    return out


def test_official_checkpoint_loads_by_renaming_and_reproduces_its_outputs(fixtures_dir):
    model = build_vqgan(VQGANConfig(**OFFICIAL_SMALL, likelihood_head=True)).eval()
    state = official_state(fixtures_dir)
    ours = model.state_dict()
    dropped = set(state) - set(ours)
    # the only tensors we lack are the authors' never-used shortcuts of same-width ResBlocks
    for key in dropped:
        prefix, index = key.split(".")[0], int(key.split(".")[2])
        block = getattr(model, prefix).blocks[index]
        assert isinstance(block, ResBlock) and block.in_channels == block.out_channels and ".conv_out." in key
    assert len(dropped) == 12
    model.load_state_dict({k: v for k, v in state.items() if k in ours}, strict=True)

    io = torch.load(fixtures_dir / "official" / "vqgan_io_small.pt", weights_only=True)
    with torch.no_grad():
        rec, codes, qinfo = model(io["images"])
        assert torch.equal(codes, io["codes"])
        torch.testing.assert_close(rec, io["reconstruction"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.decode_codes(io["codes"]), io["decoded_from_codes"], atol=1e-4, rtol=1e-4)
        assert torch.equal(model.encode_codes(io["images"]), io["codes"])
        mu, logsigma = model.decoder.probabilistic(model.quantize.lookup(codes))
        torch.testing.assert_close(mu, io["decoded_from_codes"], atol=1e-4, rtol=1e-4)
        assert logsigma.shape == mu.shape


def taming_state(fixtures_dir, levels: int = 2, res_blocks: int = 1):
    """taming's nested names -> our flat lists, walking taming's Encoder/Decoder in forward order."""
    sd = torch.load(fixtures_dir / "taming" / "taming_vqgan_small.ckpt", weights_only=True)["state_dict"]

    def has(name):
        return any(k.startswith(name + ".") for k in sd)

    def order(p, up):
        names = [p + "conv_in"]
        mid = [p + "mid.block_1", p + "mid.attn_1", p + "mid.block_2"]
        names += mid if up else []
        group, n_blocks = ("up", res_blocks + 1) if up else ("down", res_blocks)
        for i in (reversed(range(levels)) if up else range(levels)):
            for j in range(n_blocks):
                names += [f"{p}{group}.{i}.block.{j}"] + ([f"{p}{group}.{i}.attn.{j}"] if has(f"{p}{group}.{i}.attn.{j}") else [])
            if up and i != 0:
                names.append(f"{p}up.{i}.upsample")
            if not up and i != levels - 1:
                names.append(f"{p}down.{i}.downsample")
        names += [] if up else mid
        return names + [p + "norm_out", p + "conv_out"]

    out = {}
    for ours, names in (("encoder", order("encoder.", False)), ("decoder", order("decoder.", True))):
        for index, name in enumerate(names):
            for key in sd:
                if key.startswith(name + "."):
                    rest = key[len(name) + 1:].replace("nin_shortcut", "conv_out")
                    out[f"{ours}.blocks.{index}.{rest}"] = sd[key]
    for key in sd:
        if key.startswith(("quantize.", "quant_conv.", "post_quant_conv.")):
            out[key] = sd[key]
    return out


def test_taming_checkpoint_maps_onto_our_modules_and_reproduces_its_outputs(fixtures_dir):
    model = build_vqgan(VQGANConfig(**TAMING_SMALL)).eval()
    model.load_state_dict(taming_state(fixtures_dir), strict=True)
    io = torch.load(fixtures_dir / "taming" / "taming_io_small.pt", weights_only=True)
    x01 = (io["images"] + 1) / 2  # the fixture is in taming's [-1,1]; our API takes [0,1]
    with torch.no_grad():
        rec, codes, _ = model(x01)
        assert torch.equal(codes, io["codes"])
        torch.testing.assert_close(rec * 2 - 1, io["reconstruction"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.decode_codes(io["codes"]) * 2 - 1, io["decoded_from_codes"], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Quantizer
# ---------------------------------------------------------------------------------------------


def test_nearest_code_is_the_brute_force_argmin():
    torch.manual_seed(0)
    q = NearestQuantizer(codebook_size=50, emb_dim=8)
    torch.nn.init.normal_(q.embedding.weight)
    z = torch.randn(3, 8, 5, 4)
    codes = q.nearest(z)
    for b in range(3):
        for i in range(5):
            for j in range(4):
                d = [float(((z[b, :, i, j] - q.embedding.weight[k].detach()) ** 2).sum()) for k in range(50)]
                assert codes[b, i, j].item() == min(range(50), key=d.__getitem__)
    z_q, codes2, _ = q(z)
    assert torch.equal(codes, codes2)
    torch.testing.assert_close(z_q, q.embedding.weight[codes].permute(0, 3, 1, 2))


def test_straight_through_gradient_reaches_z_unchanged():
    torch.manual_seed(1)
    q = NearestQuantizer(codebook_size=16, emb_dim=4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, _ = q(z)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)  # d z_q / d z is the identity
    assert q.embedding.weight.grad is None  # the straight-through output does not move the codebook


def test_codebook_and_commit_terms_by_hand():
    torch.manual_seed(2)
    q = NearestQuantizer(codebook_size=6, emb_dim=3)
    torch.nn.init.normal_(q.embedding.weight)
    z = torch.randn(1, 3, 2, 2, requires_grad=True)
    _, codes, qinfo = q(z)
    e = q.embedding.weight.detach()[codes.flatten()]  # [4,3]
    zf = z.detach().permute(0, 2, 3, 1).reshape(4, 3)
    expected = ((e - zf) ** 2).sum() / 12.0
    torch.testing.assert_close(qinfo["codebook_loss"], expected)
    torch.testing.assert_close(qinfo["commit_loss"], expected)
    # codebook term: gradient only to the codebook, 2(e_k - z)/n summed per code
    qinfo["codebook_loss"].backward(retain_graph=True)
    assert z.grad is None
    grad_e = torch.zeros(6, 3)
    for n, k in enumerate(codes.flatten().tolist()):
        grad_e[k] += 2.0 * (e[n] - zf[n]) / 12.0
    torch.testing.assert_close(q.embedding.weight.grad, grad_e)
    # commitment term: gradient only to z, 2(z - e_k)/n
    q.embedding.weight.grad = None
    qinfo["commit_loss"].backward()
    assert q.embedding.weight.grad is None
    torch.testing.assert_close(z.grad.permute(0, 2, 3, 1).reshape(4, 3), 2.0 * (zf - e) / 12.0)


def test_usage_and_perplexity_by_hand():
    q = NearestQuantizer(codebook_size=8, emb_dim=2)
    codes = torch.tensor([[[0, 0], [1, 2]]])  # histogram 2,1,1 over 4 tokens
    stats = q.usage_stats(codes)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert stats["usage"].item() == pytest.approx(3 / 8)
    assert stats["perplexity"].item() == pytest.approx(float(torch.exp(-(p * p.log()).sum())))  # 2^1.5
    assert stats["perplexity"].item() == pytest.approx(2 ** 1.5)
    uniform = q.usage_stats(torch.arange(8).view(1, 2, 4))
    assert uniform["usage"].item() == 1.0 and uniform["perplexity"].item() == pytest.approx(8.0)


# ---------------------------------------------------------------------------------------------
# Blocks, shapes, sizes
# ---------------------------------------------------------------------------------------------


def test_attention_block_equals_the_explicit_softmax():
    torch.manual_seed(3)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 4, 3)
    h = block.norm(x)
    q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # [B,C,N]
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 32 ** 0.5, dim=2)
    ref = x + block.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(2, 32, 4, 3))
    torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)


def test_demo_recipe_shapes_and_round_trip():
    cfg = load_config("demo").model.vqgan
    model = build_vqgan(cfg)
    x = torch.rand(2, 3, cfg.img_size, cfg.img_size)
    rec, codes, qinfo = model(x)
    assert rec.shape == x.shape and codes.shape == (2, *cfg.latent_shape) == (2, 8, 8)
    assert codes.dtype == torch.long and model.latent_shape == (8, 8) and model.codebook_size == 64
    assert model.decode_codes(codes).shape == x.shape
    assert set(qinfo) >= {"codebook_loss", "commit_loss", "usage", "perplexity"}


@pytest.fixture(scope="module")
def paper_vqgan():
    """The ffhq recipe's VQGAN with the likelihood head, its sizes counted, then moved to `meta`
    (shape-only tensors) so that forward passes at 256x256 cost nothing."""
    cfg = load_config("ffhq", ["model.vqgan.likelihood_head=true"]).model.vqgan
    model = build_vqgan(cfg)
    unused = sum(b.in_channels * b.in_channels + b.in_channels for b in model.decoder.blocks
                 if isinstance(b, ResBlock) and b.in_channels == b.out_channels)
    sizes = {"decoder": n_params(model.decoder), "head": n_params(model.decoder.logsigma), "unused": unused}
    return model.to("meta"), sizes


def test_paper_config_shapes(paper_vqgan):
    model, _ = paper_vqgan
    z = model.encoder(torch.empty(1, 3, 256, 256, device="meta"))
    assert z.shape == (1, 256, 16, 16)
    assert model.decoder(z).shape == (1, 3, 256, 256)
    assert model.latent_shape == (16, 16)


def test_paper_decoder_size_matches_the_authors_35_2m(paper_vqgan):
    """The authors' Generator holds 35.2M parameters (docs/performance.md): ours plus the likelihood head and
    the never-used same-width shortcut convs that their ResBlock always creates."""
    _, sizes = paper_vqgan
    authors = sizes["decoder"] + sizes["unused"]
    assert authors == 35_168_262 and round(authors / 1e6, 1) == 35.2
    assert sizes["decoder"] - sizes["head"] == 33_722_755  # what uvq trains by default (no head)


@pytest.mark.parametrize("variant_cfg", [OFFICIAL_SMALL, TAMING_SMALL], ids=["official", "taming"])
def test_both_variants_train(variant_cfg):
    torch.manual_seed(4)
    model = build_vqgan(VQGANConfig(**variant_cfg))
    x = torch.rand(2, 3, 32, 32)
    rec, _, qinfo = model(x)
    loss = (rec - x).abs().mean() + qinfo["commit_loss"] + 0.25 * qinfo["codebook_loss"]
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.last_layer is model.decoder.blocks[-1].weight


def test_taming_variant_structure_and_signed_io():
    model = build_vqgan(VQGANConfig(**TAMING_SMALL))
    assert model.quant_conv.weight.shape == (16, 32, 1, 1) and model.post_quant_conv.weight.shape == (32, 16, 1, 1)
    n_res = sum(isinstance(b, ResBlock) for b in model.decoder.blocks)
    assert n_res == 2 + 2 * 2  # mid + (res_blocks + 1) per level
    assert model.encoder.final_swish and model.decoder.final_swish
    z = torch.randn(1, 16, 16, 16)
    expected = (model.decoder(model.post_quant_conv(z)) + 1) / 2
    torch.testing.assert_close(model.decode(z), expected)
    official = build_vqgan(VQGANConfig(**OFFICIAL_SMALL))
    assert official.quant_conv is None and not official.encoder.final_swish
    assert sum(isinstance(b, ResBlock) for b in official.decoder.blocks) == 2 + 2 * 1


def test_registry_and_checkpoint_builders():
    cfg = VQGANConfig(**OFFICIAL_SMALL)
    assert isinstance(registry.get("encoders", "vqgan_encoder.v1")(cfg), Encoder)
    assert isinstance(registry.get("decoders", "vqgan_decoder.v1")(cfg), Decoder)
    assert isinstance(registry.get("quantizers", "nearest.v1")(cfg), NearestQuantizer)
    model = build_model("vqgan", dict(OFFICIAL_SMALL))
    assert model.codebook_size == 64 and model.latent_shape == (16, 16)


def test_official_variant_refuses_z_channels():
    with pytest.raises(ConfigError, match="z_channels"):
        load_config("demo", ["model.vqgan.z_channels=64"])
    load_config("demo", ["model.vqgan.z_channels=64", "model.vqgan.variant=taming"])
