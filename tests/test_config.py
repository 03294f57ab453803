"""Recipes load strictly: unknown keys, wrong types and impossible values fail at load time."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from uvq.config import (
    Config,
    ConfigError,
    PriorConfig,
    VQGANConfig,
    config_from_dict,
    load_config,
    section_from_dict,
    to_yaml,
)

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_round_trips(recipe):
    cfg = load_config(recipe)
    again = config_from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg
    # both stages are present and agree with each other
    assert tuple(cfg.model.prior.latent_shape) == cfg.model.vqgan.latent_shape
    assert cfg.model.prior.codebook_size == cfg.model.vqgan.codebook_size


@pytest.mark.parametrize("name", ["ffhq", "churches", "bedroom"])
def test_paper_recipes_match_method(name):
    cfg = load_config(name)
    vq, prior = cfg.model.vqgan, cfg.model.prior
    assert (vq.img_size, vq.nf, vq.ch_mult, vq.res_blocks, vq.attn_resolutions) == (256, 128, [1, 1, 2, 2, 4], 2, [16])
    assert (vq.emb_dim, vq.codebook_size, vq.latent_shape, vq.variant) == (256, 1024, (16, 16), "official")
    assert (prior.n_layer, prior.n_embd, prior.n_head, prior.n_tokens, prior.mask_id) == (24, 512, 8, 256, 1024)
    assert cfg.train.batch_size == 4 and cfg.train.learning_rate == pytest.approx(4.5e-6 * 4)
    assert (cfg.train.beta, cfg.train.disc_start_step, cfg.train.disc_weight_max) == (0.25, 30001, 1.0)
    assert (cfg.train.ema_beta, cfg.train.ema_every) == (0.995, 10)
    assert cfg.prior_train.batch_size == 20 and cfg.prior_train.loss == "reweighted_elbo.v1"
    lr, warmup = (1e-4, 30000) if name == "ffhq" else (2e-4, 10000)
    assert (cfg.prior_train.lr, cfg.prior_train.warmup_steps) == (lr, warmup)
    assert cfg.sample.temp == 0.9 and cfg.eval.k == 3


def test_unknown_key_names_path_and_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'train.batchsize'; did you mean 'train.batch_size'"):
        load_config("demo", ["train.batchsize=3"])
    with pytest.raises(ConfigError, match=r"model.vqgan.codebooksize.*model.vqgan.codebook_size"):
        config_from_dict({"model": {"vqgan": {"codebooksize": 3}}})
    with pytest.raises(ConfigError, match=r"unknown key 'trian'"):
        config_from_dict({"trian": {}})


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=x", "train.batch_size must be an integer"),
        ("train.batch_size=0", "train.batch_size must be >= 1"),
        ("model.vqgan.codebook_size=1", "codebook_size must be >= 2"),
        ("model.vqgan.img_size=30", "not divisible by the downsampling factor 4"),
        ("train.beta_placement=middle", "must be one of"),
        ("sample.temp=0", "sample.temp must be between 0.001 and 1000"),
        ("train.ema=maybe", "must be true or false"),
        ("model.vqgan.ch_mult=3", "must be a list"),
        ("prior_train.lr=-1", "prior_train.lr must be positive"),
        ("model.prior.n_head=3", "must be divisible by model.prior.n_head"),
    ],
)
def test_bad_values_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_cross_section_rules():
    with pytest.raises(ConfigError, match="model.prior.codebook_size .* must equal model.vqgan.codebook_size"):
        load_config("demo", ["model.prior.codebook_size=128"])
    with pytest.raises(ConfigError, match="latent_shape"):
        load_config("demo", ["model.vqgan.img_size=64"])


def test_overrides_parse_yaml_scalars_and_lists():
    cfg = load_config("demo", ["train.lr=0.01", "model.vqgan.ch_mult=[1,2]", "model.vqgan.img_size=32",
                               "model.prior.latent_shape=[16,16]", "data.source=/tmp/x", "train.grad_clip=null"])
    assert cfg.train.lr == 0.01 and cfg.model.vqgan.ch_mult == [1, 2] and cfg.data.source == "/tmp/x"
    assert cfg.train.grad_clip is None and cfg.model.vqgan.latent_shape == (16, 16)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("demo", ["nonsense"])


def test_ints_widen_to_floats_but_not_bools():
    cfg = config_from_dict({"prior_train": {"lr": 1}})
    assert isinstance(cfg.prior_train.lr, float)
    with pytest.raises(ConfigError):
        config_from_dict({"prior_train": {"lr": True}})


def test_derived_values_and_sections():
    vq = section_from_dict(VQGANConfig, {"img_size": 64, "ch_mult": [1, 2, 2, 4]}, "model.vqgan")
    assert vq.downsample == 8 and vq.latent_shape == (8, 8)
    assert VQGANConfig(variant="taming", res_blocks=1).decoder_res_blocks == 2
    assert VQGANConfig(variant="official", res_blocks=2).decoder_res_blocks == 2
    p = PriorConfig(codebook_size=64, latent_shape=[8, 8])
    assert p.n_tokens == 64 and p.mask_id == 64
    assert Config().validate()


def test_missing_recipe_lists_packaged_ones():
    with pytest.raises(ConfigError, match="demo"):
        load_config("no-such-recipe")
