"""The stage-two network: layout, parameter count, the authors' outputs, presets."""

from __future__ import annotations

import pytest
import torch

from uvq.config import PriorConfig, load_config
from uvq.interop.layouts import infer_official_prior, map_official_prior
from uvq.interop.reference import reference_from
from uvq.prior.model import (
    PRESETS,
    AbsorbingTransformer,
    build_absorbing_transformer,
    flops_per_token,
    preset,
)
from uvq.registry import registry
from uvq.runtime import UserError


def test_paper_preset_has_76_8m_parameters():
    with torch.device("meta"):
        model = build_absorbing_transformer(preset("paper"))
    # 24 x 3,152,384 (blocks) + 524,800 (tok_emb) + 131,072 (pos_emb) + 1,024 (ln_f) + 524,288 (head)
    assert model.num_parameters() == 76_838_400
    assert round(model.num_parameters() / 1e6, 1) == 76.8


def test_paper_forward_flops_match_the_anchor():
    # docs/performance.md: one forward pass over 256 tokens costs 42.1 GFLOP.
    assert flops_per_token(512, 24, 256, 1024) * 256 / 1e9 == pytest.approx(42.1, abs=0.05)


def test_forward_shapes_and_independent_reference():
    torch.manual_seed(0)
    cfg = PriorConfig(n_embd=32, n_head=4, n_layer=2, codebook_size=10, latent_shape=[3, 4])
    model = build_absorbing_transformer(cfg).eval()
    with torch.no_grad():
        model.pos_emb.normal_(0, 0.5)
    x = torch.randint(0, 11, (5, 12))
    x[0] = cfg.mask_id
    logits = model(x)
    assert logits.shape == (5, 12, 10) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference_from(model, 4)(x), rtol=1e-5, atol=1e-5)


def test_attention_is_bidirectional():
    torch.manual_seed(1)
    model = build_absorbing_transformer(preset("debug")).eval()
    x = torch.randint(0, 16, (1, 16))
    y = x.clone()
    y[0, -1] = 16  # mask the last token
    with torch.no_grad():
        assert not torch.allclose(model(x)[0, 0], model(y)[0, 0])  # the first position sees the last


def test_official_fixture_logits_are_reproduced(fixtures_dir):
    official = torch.load(fixtures_dir / "official" / "absorbing_ema_small.th", weights_only=True)
    io = torch.load(fixtures_dir / "official" / "absorbing_io_small.pt", weights_only=True)
    settings = infer_official_prior(official, n_head=4)
    assert settings == {"codebook_size": 64, "latent_shape": [16, 16], "n_embd": 64, "n_head": 4, "n_layer": 2}
    model = AbsorbingTransformer(codebook_size=64, n_tokens=256, n_embd=64, n_head=4, n_layer=2).eval()
    mapping = map_official_prior(official, fused_qkv=True)
    assert not mapping.unexpected
    model.load_state_dict(mapping.weights, strict=True)
    assert model.mask_id == int(io["mask_id"])
    with torch.no_grad():
        logits = model(io["x_t"])
    rel = (logits - io["logits"]).abs().max() / io["logits"].abs().max()
    assert rel < 1e-5, rel


def test_official_qkv_fuse_in_query_key_value_order():
    good = {"_denoise_fn.blocks.0.attn.query.weight": torch.zeros(2, 2),
            "_denoise_fn.blocks.0.attn.key.weight": torch.ones(2, 2),
            "_denoise_fn.blocks.0.attn.value.weight": 2 * torch.ones(2, 2), "Lt_history": torch.zeros(3)}
    mapping = map_official_prior(good, fused_qkv=True)
    fused = mapping.weights["blocks.0.attn.qkv.weight"]
    assert fused.shape == (6, 2) and fused[:2].eq(0).all() and fused[2:4].eq(1).all() and fused[4:].eq(2).all()
    assert map_official_prior({"model.head.weight": torch.zeros(1)}, fused_qkv=True).unexpected == ["model.head.weight"]
    incomplete = map_official_prior({"_denoise_fn.blocks.0.attn.query.weight": torch.zeros(2, 2)}, fused_qkv=True)
    assert incomplete.unexpected == ["_denoise_fn.blocks.0.attn.query.weight"]


def test_registry_builds_presets():
    builder = registry.get("priors", "absorbing_transformer.v1")
    for name in PRESETS:
        cfg = preset(name)
        with torch.device("meta"):
            model = builder(cfg)
        assert model.codebook_size == cfg.codebook_size and model.n_tokens == cfg.n_tokens
    with pytest.raises(UserError, match="valid: paper"):
        preset("huge")


def test_demo_preset_is_the_demo_recipe():
    recipe = load_config("demo").model.prior
    demo = preset("demo")
    assert (recipe.n_embd, recipe.n_head, recipe.n_layer, recipe.codebook_size, list(recipe.latent_shape)) == \
        (demo.n_embd, demo.n_head, demo.n_layer, demo.codebook_size, list(demo.latent_shape))


def test_dropout_only_in_training():
    torch.manual_seed(2)
    model = AbsorbingTransformer(codebook_size=8, n_tokens=6, n_embd=16, n_head=2, n_layer=1, dropout=0.5)
    x = torch.randint(0, 9, (2, 6))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))
