"""Recipes load strictly: unknown keys, wrong types and impossible values fail at load time."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml

import uvq
from uvq.config import (
    MAX_DEMO_IMAGES,
    MAX_YAML_VALUES,
    SEED_MAX,
    Config,
    ConfigError,
    PriorConfig,
    VQGANConfig,
    config_from_dict,
    drop_legacy_keys,
    is_recipe_name,
    load_config,
    parse_override,
    parse_yaml,
    recipe_names,
    section_from_dict,
    to_yaml,
)
from uvq.prior.latents import LatentStream, read_manifest, write_latents

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
    assert cfg.train.batch_size == 4 and cfg.train.learning_rate() == pytest.approx(4.5e-6 * 4)
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
        ("model.vqgan.codebook_size=1", r"model.vqgan.codebook_size must be in \[2, 65535\] \(got 1\)"),
        ("model.vqgan.img_size=30", "not divisible by the downsampling factor 4"),
        ("train.beta_placement=middle", "must be one of"),
        ("sample.temp=0", "sample.temp must be between 0.001 and 1000"),
        ("train.ema=maybe", "must be true or false"),
        ("model.vqgan.ch_mult=3", "must be a list"),
        ("prior_train.lr=-1", r"prior_train.lr must be > 0.0 \(got -1.0\)"),
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
    with pytest.raises(ConfigError, match="no packaged recipe named 'no-such-recipe'; packaged recipes: .*demo"):
        load_config("no-such-recipe")


# ---------------------------------------------------------------------------------------------
# YAML: 1.2 numbers, duplicate keys, aliases, encodings, one-line errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [("1e-4", 1e-4), ("1E5", 1e5), ("-2.5e-3", -2.5e-3), (".5", 0.5), ("5.", 5.0), ("+1.0", 1.0),
     ("12", 12), ("012", 12), ("0o17", 15), ("0x1F", 31), ("1_500_000", 1_500_000), ("-3", -3)],
)
def test_yaml_1_2_numbers_in_recipes_and_overrides(tmp_path, text, value):
    """Every YAML 1.2 core-schema number is a number (PyYAML's 1.1 reads `1e-4` as a string, `012` as 10)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"train:\n  lr: {text}\n")
    from_file = parse_yaml(recipe.read_text(), str(recipe))["train"]["lr"]
    _, from_override = parse_override(f"train.lr={text}")
    assert from_file == from_override == value and type(from_file) is type(from_override) is type(value)
    if value > 0:  # and a recipe takes it
        assert load_config(recipe).train.lr == load_config("demo", [f"train.lr={text}"]).train.lr == value


@pytest.mark.parametrize("text", ["1:20", "0b11", "1.5_0", "0x", "1e", "e5"])
def test_yaml_1_1_only_forms_are_strings(text):
    assert parse_yaml(text, "x") == text


def test_learning_rates_in_scientific_notation():
    cfg = load_config("demo", ["prior_train.lr=1e-4", "train.lr=4.5E-6"])
    assert cfg.prior_train.lr == 1e-4 and cfg.train.lr == 4.5e-6


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", ".NaN", "+.INF"])
def test_non_finite_numbers_parse_and_are_refused(text):
    assert not math.isfinite(parse_yaml(text, "x"))
    with pytest.raises(ConfigError, match=r"^prior_train.lr must be a finite number \(got "):
        load_config("demo", [f"prior_train.lr={text}"])


def _float_and_int_fields(cls, prefix):
    """(path, kind) of every float and int option in the config tree, nested sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _float_and_int_fields(tp, path + ".")
            continue
        if typing.get_origin(tp) is list:  # a list option: its first item
            tp, path = typing.get_args(tp)[0], f"{path}[0]"
        options = set(typing.get_args(tp)) - {type(None)} or {tp}
        if float in options:
            yield path, "float"
        elif int in options:
            yield path, "int"


NUMERIC = list(_float_and_int_fields(Config, ""))


def test_the_numeric_walk_sees_every_section():
    paths = {p for p, _ in NUMERIC}
    assert {"train.lr", "train.beta", "prior_train.lr", "prior_train.weight_decay", "run.seed",
            "data.demo_images", "model.prior.dropout", "eval.k"} <= paths


@pytest.mark.parametrize("path, kind", NUMERIC, ids=[p for p, _ in NUMERIC])
def test_every_numeric_option_refuses_non_finite_and_huge_values(path, kind):
    """No float option takes inf or nan; no integer option takes a value past 64 bits."""
    key, value = (path[:-3], "[{}]") if path.endswith("[0]") else (path, "{}")
    if kind == "float":
        for bad in (".inf", "-.inf", ".nan"):
            with pytest.raises(ConfigError, match=rf"^{re.escape(path)} must be a finite number"):
                load_config("demo", [f"{key}={value.format(bad)}"])
    else:
        with pytest.raises(ConfigError, match=rf"^{re.escape(path)} must be a 64-bit integer"):
            load_config("demo", [f"{key}={value.format(2**63)}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=.inf", r"train.lr must be a finite number \(got inf\)"),
        ("train.disc_weight=.nan", r"train.disc_weight must be a finite number \(got nan\)"),
        ("train.beta=.nan", r"train.beta must be a finite number"),
        ("train.codebook_weight=-1", r"train.codebook_weight must be >= 0.0 \(got -1.0\)"),
        ("train.disc_weight=-0.5", r"train.disc_weight must be >= 0.0"),
        ("train.beta=-1", r"train.beta must be >= 0.0"),
        ("train.disc_start_step=-1", r"train.disc_start_step must be >= 0"),
        ("train.ema_start=-1", r"train.ema_start must be >= 0"),
        ("run.seed=9223372036854775808", r"run.seed must be a 64-bit integer"),
        ("run.seed=-1", r"run.seed must be in \[0, 2147483647\] \(got -1\)"),
        ("run.seed=2147483648", r"run.seed must be in \[0, 2147483647\]"),
        ("data.demo_images=100000000000", r"data.demo_images must be in \[8, 1000000\] .*held in memory"),
        ("data.demo_images=1e11", r"data.demo_images must be an integer"),
        ("data.val_fraction=1", r"data.val_fraction must be in \[0.0, 1.0\)"),
        ("train.batch_size=0", r"train.batch_size must be >= 1 \(got 0\)"),
        ("prior_train.batch_size=0", r"prior_train.batch_size must be >= 1"),
        ("encode.batch_size=0", r"encode.batch_size must be >= 1"),
        ("eval.batch_size=0", r"eval.batch_size must be >= 1"),
        ("eval.k=0", r"eval.k must be >= 1"),
        ("prior_train.T=0", r"prior_train.T must be in \[1, 1000000\]"),
        ("prior_train.T=10000000", r"prior_train.T must be in \[1, 1000000\] .*T \+ 1 entries"),
        ("run.keep_last=0", r"run.keep_last must be >= 1"),
        ("model.vqgan.z_channels=0", r"model.vqgan.z_channels must be >= 1"),
        ("model.vqgan.attn_resolutions=[0]", r"model.vqgan.attn_resolutions must be integers >= 1"),
        ("model.prior.dropout=1", r"model.prior.dropout must be in \[0.0, 1.0\)"),
        ("model.prior.n_head=0", r"model.prior.n_head must be >= 1"),
    ],
)
def test_values_out_of_range_name_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


# The prior's train section has the VQGAN's optimiser and EMA rules (one function states them).
@pytest.mark.parametrize("section", ["train", "prior_train"])
@pytest.mark.parametrize(
    "key, bad, message",
    [
        ("betas", "[0.9,1.0]", r"betas must be two numbers in \[0, 1\) \(got \[0.9, 1.0\]\)"),
        ("betas", "[0.9]", r"betas must be two numbers in \[0, 1\)"),
        ("betas", "[-0.1,0.9]", r"betas must be two numbers in \[0, 1\)"),
        ("grad_clip", "0", r"grad_clip must be > 0.0 \(got 0.0\); null for no clipping"),
        ("ema_beta", "1", r"ema_beta must be in \(0.0, 1.0\)"),
        ("ema_beta", "0", r"ema_beta must be in \(0.0, 1.0\)"),
        ("ema_every", "0", r"ema_every must be >= 1"),
        ("ema_start", "-1", r"ema_start must be >= 0"),
        ("lr", "0", r"lr must be > 0.0"),
    ],
)
def test_both_train_sections_check_optimiser_and_ema(section, key, bad, message):
    with pytest.raises(ConfigError, match=rf"^{section}\.{message}"):
        load_config("demo", [f"{section}.{key}={bad}"])


def test_prior_weight_decay_and_valid_edges():
    with pytest.raises(ConfigError, match=r"prior_train.weight_decay must be >= 0.0 \(got -0.01\)"):
        load_config("demo", ["prior_train.weight_decay=-0.01"])
    cfg = load_config("demo", ["prior_train.weight_decay=0.01", "prior_train.grad_clip=1.0", "prior_train.betas=[0.0,0.99]",
                               f"run.seed={SEED_MAX}", f"data.demo_images={MAX_DEMO_IMAGES}", "prior_train.T=1"])
    assert cfg.prior_train.weight_decay == 0.01 and cfg.run.seed == SEED_MAX


def test_largest_seed_runs_the_latent_stream(tmp_path):
    """SEED_MAX is chosen so the seeds the trainers derive from it fit torch's generator."""
    items = [(f"k{i}", np.full((2, 2), i, dtype=np.uint16)) for i in range(12)]
    write_latents(tmp_path, {"train": items}, codebook_size=16, shard_size=5)
    stream = iter(LatentStream(read_manifest(tmp_path), batch_size=12, seed=SEED_MAX, buffer_shards=2))
    for _ in range(3):  # three epochs
        assert sorted(next(stream)[:, 0, 0].tolist()) == list(range(12))


def test_duplicate_keys_are_refused_with_path_and_line(tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("train:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert str(err.value) == f"{recipe}:4: duplicate key 'train.lr' (first at line 2); keep one"
    recipe.write_text("train: {}\nrun: {}\ntrain: {}\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:3: duplicate key 'train'"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config("demo", ["train.betas={a: 1, a: 2}"])


def _laughs(levels: int = 9) -> str:
    """The 'billion laughs' document: each level is nine aliases of the previous one (9**9 leaves)."""
    lines = ['  a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"  a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "data:\n" + "\n".join(lines) + "\n"


def test_billion_laughs_fails_fast_in_one_line(tmp_path):
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(_laughs())
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert time.perf_counter() - start < 2.0
    message = str(err.value)
    assert "\n" not in message and len(message) < 300
    assert message.startswith(f"{recipe}:") and f"more than {MAX_YAML_VALUES} values through YAML aliases" in message


def _nested(levels: int) -> str:
    """A flow list of 9**(levels + 1) leaves, written with anchors inside itself."""
    inner = "[" + ",".join(["lol"] * 9) + "]"
    for i in range(levels):
        inner = f"[&x{i} {inner}" + f", *x{i}" * 8 + "]"
    return inner


def test_aliases_below_the_limit_work_and_messages_stay_short(tmp_path):
    recipe = tmp_path / "alias.yaml"
    recipe.write_text("train:\n  betas: &b [0.5, 0.9]\nprior_train:\n  betas: *b\n")
    assert load_config(recipe).prior_train.betas == load_config(recipe).train.betas == [0.5, 0.9]
    # 9**4 = 6561 leaves: under the limit, but far too long to print; the message quotes a prefix.
    recipe.write_text(f"data:\n  source: {_nested(3)}\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert str(err.value).startswith("data.source must be a string, got [[[") and len(str(err.value)) < 300


def test_recursive_alias_is_refused(tmp_path):
    recipe = tmp_path / "loop.yaml"
    recipe.write_text("model:\n  vqgan:\n    ch_mult: &m [1, *m]\n")
    with pytest.raises(ConfigError, match=r"loop.yaml:3: model.vqgan.ch_mult\[1\] contains itself through a YAML alias"):
        load_config(recipe)


def test_non_utf8_recipe_is_one_line(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("data:\n  source: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert str(err.value) == f"{recipe} is not UTF-8 text (byte 19 is 0xe9); save the recipe as UTF-8"
    recipe.write_bytes("\ufeffdata:\n  source: caf\u00e9\n".encode())  # a UTF-8 byte-order mark is fine
    assert load_config(recipe).data.source == "caf\u00e9"


@pytest.mark.parametrize(
    "text, where",
    [("train:\n  lr: [1, 2\n  steps: 3\n", r":3:8: not valid YAML: expected ',' or '\]', but got ':'"),
     ("train:\n  lr: 1\n bad\n", r":3:2: not valid YAML: "),
     ("train: !!python/object:os.system {}\n", r":1:8: not valid YAML: could not determine a constructor"),
     ("run:\n  seed: !!int 1.5\n", r":2:9: not valid YAML: '1.5' is not a YAML 1.2 integer"),
     ("run:\n  seed: \x00\n", r": not valid YAML: unacceptable character #x0000")],
)
def test_yaml_errors_are_one_line_with_file_line_and_column(tmp_path, text, where):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert "\n" not in str(err.value)
    assert re.match(re.escape(str(recipe)) + where, str(err.value)), str(err.value)


def test_override_yaml_errors_are_one_line():
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["model.vqgan.ch_mult=[1,2"])
    assert "\n" not in str(err.value) and str(err.value).startswith("override 'model.vqgan.ch_mult=[1,2':1:")


# ---------------------------------------------------------------------------------------------
# Recipe names and paths; recipes are package data
# ---------------------------------------------------------------------------------------------


def test_recipes_are_package_data_and_the_top_level_folder_links_to_them():
    packaged = Path(uvq.__file__).parent / "recipes"
    assert recipe_names() == sorted(p.stem for p in packaged.glob("*.yaml")) and "demo" in recipe_names()
    top = Path(__file__).resolve().parents[1] / "recipes"
    assert top.is_symlink() and os.readlink(top) == "uvq/recipes"  # relative, so a clone keeps it


def test_a_path_that_does_not_exist_never_loads_a_packaged_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in ("myrecipe/demo.yaml", "demo.yaml", "demo.yml", "./demo", str(tmp_path / "demo.yaml")):
        with pytest.raises(ConfigError, match=rf"recipe '{re.escape(missing)}' does not exist; .*packaged recipe by its bare name: .*demo"):
            load_config(missing)
    with pytest.raises(ConfigError, match=r"recipe '.*' is a directory"):
        load_config(str(tmp_path))


def test_bare_names_are_packaged_and_paths_are_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.yaml").write_text("run:\n  seed: 7\n")
    (tmp_path / "demo").write_text("run:\n  seed: 8\n")
    assert load_config("demo").run.seed == 0 and load_config("demo").model.vqgan.img_size == 32  # packaged
    assert load_config("demo.yaml").run.seed == 7  # a path (it has the suffix)
    assert load_config("./demo").run.seed == 8  # a path (it has a slash)
    assert load_config(Path("demo.yaml")).run.seed == 7
    assert [is_recipe_name(r) for r in ("demo", "ffhq", "demo.v2", "demo.yaml", "a/b", "./demo", "")] == \
        [True, True, True, False, False, False, False]


# ---------------------------------------------------------------------------------------------
# Derived values, and the removed options
# ---------------------------------------------------------------------------------------------


def test_learning_rate_scales_with_world_size_only_when_derived():
    cfg = load_config("demo", ["train.lr=null", "train.batch_size=4"])
    assert cfg.train.learning_rate(1) == pytest.approx(4.5e-6 * 4)
    assert cfg.train.learning_rate(8) == pytest.approx(4.5e-6 * 4 * 8)  # the global batch
    fixed = load_config("demo", ["train.lr=0.001"])
    assert fixed.train.learning_rate(1) == fixed.train.learning_rate(8) == 0.001


def test_diffusion_steps_default_to_the_number_of_tokens():
    cfg = load_config("ffhq")
    assert cfg.prior_train.T is None and cfg.prior_train.diffusion_steps(cfg.model.prior) == 256  # paper: T = N
    cfg = load_config("demo", ["prior_train.T=10"])
    assert cfg.prior_train.diffusion_steps(cfg.model.prior) == 10


def test_removed_options_refused_in_recipes_but_saved_configs_still_load(tmp_path):
    for override in ("eval.num_samples=50000", "model.prior.time_conditioning=false"):
        with pytest.raises(ConfigError, match=r"^recipe demo: .* was removed \(.*\); delete it"):
            load_config("demo", [override])
    recipe = tmp_path / "old.yaml"
    recipe.write_text("eval:\n  num_samples: 256\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(recipe))}: eval.num_samples was removed"):
        load_config(recipe)
    # A checkpoint's or run directory's embedded config from before the removal loads as it was.
    saved = load_config("demo").to_dict()
    saved["eval"]["num_samples"] = 256
    saved["model"]["prior"]["time_conditioning"] = False
    assert config_from_dict(saved) == load_config("demo")
    prior = section_from_dict(PriorConfig, saved["model"]["prior"], "model.prior")
    assert prior == load_config("demo").model.prior
    assert drop_legacy_keys(saved) == load_config("demo").to_dict() and "num_samples" in saved["eval"]
    # time_conditioning: true was refused by every version, so no saved config can hold it.
    with pytest.raises(ConfigError, match="model.prior.time_conditioning = True was never supported"):
        section_from_dict(PriorConfig, {**saved["model"]["prior"], "time_conditioning": True}, "model.prior")
