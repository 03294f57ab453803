"""The registry: versioned names, clear lookup errors, entry-point plugins, one contract test per
category that builds and runs every entry, names resolved when a recipe loads, and `uvq ls`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import inception_weights  # noqa: F401  (a session fixture: random Inception weights)

from uvq.config import (
    DataConfig,
    DiscriminatorConfig,
    EvalConfig,
    PriorConfig,
    PriorTrainConfig,
    VQGANConfig,
    load_config,
)
from uvq.registry import BUILTIN_MODULES, CATEGORIES, ENTRY_POINT_GROUP, Registry, registry
from uvq.runtime import UserError
from uvq.sampling.chain import SampleRNG, run_chain

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "uvq-ls.txt"


def test_register_and_lookup():
    reg = Registry()
    reg._loaded = True  # an isolated registry without uvq's modules

    @reg.register("samplers", "toy.v1")
    def toy():
        return 1

    assert reg.get("samplers", "toy.v1") is toy
    assert reg.names("samplers") == ["toy.v1"]
    with pytest.raises(UserError, match=r"unknown samplers name 'toy\.v2' \(did you mean 'toy\.v1'\?\); valid names: toy\.v1"):
        reg.get("samplers", "toy.v2")
    with pytest.raises(UserError, match="unknown registry category"):
        reg.get("widgets", "toy.v1")
    assert "test_registry.py" in reg.entry("samplers", "toy.v1").where


def test_names_must_be_versioned_and_stable():
    reg = Registry()
    with pytest.raises(ValueError, match="must be lowercase and end in a version"):
        reg.register("samplers", "NoVersion")
    def first():
        return 1

    def second():
        return 2

    reg.register("samplers", "a.v1")(first)
    reg.register("samplers", "a.v1")(first)  # re-importing the same module is harmless
    with pytest.raises(ValueError, match="already registered"):
        reg.register("samplers", "a.v1")(second)


def test_plugin_arrives_through_entry_points(tmp_path):
    """Install a tiny plugin (a real distribution with an entry point) and find it from a fresh process."""
    site = tmp_path / "site"
    pkg = site / "uvq_tiny_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from uvq.registry import register

        @register("samplers", "tiny_plugin_sampler.v1")
        def tiny_plugin_sampler(*args, **kwargs):
            """A third-party sampler."""
            return None
    '''))
    dist = site / "uvq_tiny_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: uvq-tiny-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ntiny = uvq_tiny_plugin\n")
    code = ("from uvq.registry import registry; "
            "print(registry.entry('samplers', 'tiny_plugin_sampler.v1').where)")
    env_path = f"{site}"
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": env_path, "PATH": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "uvq_tiny_plugin:tiny_plugin_sampler" in out.stdout
    # and `uvq ls` shows it
    ls = subprocess.run([sys.executable, "-m", "uvq", "ls", "samplers"], env={"PYTHONPATH": env_path, "PATH": ""},
                        capture_output=True, text=True, timeout=120)
    assert ls.returncode == 0, ls.stderr
    assert "tiny_plugin_sampler.v1" in ls.stdout


def test_broken_plugin_is_one_clear_error(tmp_path):
    site = tmp_path / "site"
    (site / "uvq_broken_plugin").mkdir(parents=True)
    (site / "uvq_broken_plugin" / "__init__.py").write_text("raise ImportError('needs libfoo')\n")
    dist = site / "uvq_broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: uvq-broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbroken = uvq_broken_plugin\n")
    ls = subprocess.run([sys.executable, "-m", "uvq", "ls"], env={"PYTHONPATH": str(site), "PATH": ""},
                        capture_output=True, text=True, timeout=120)
    assert ls.returncode == 2
    assert ls.stderr.strip().splitlines() == [
        "error: plugin 'broken' (uvq_broken_plugin) from entry-point group uvq.plugins failed to load: ImportError: needs libfoo"]


# ---------------------------------------------------------------------------------------------
# The registering modules: BUILTIN_MODULES is every module of uvq/ that registers
# ---------------------------------------------------------------------------------------------


def test_builtin_modules_are_exactly_the_registering_modules():
    registering = set()
    for path in (ROOT / "uvq").rglob("*.py"):
        if re.search(r"^@register\(", path.read_text(), flags=re.M):
            registering.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
    assert registering == set(BUILTIN_MODULES)
    registry.load()
    assert {e.func.__module__ for e in registry.entries()} == registering  # and each of them registers


def test_every_category_states_one_signature_and_has_entries():
    registry.load()
    for category, signature in CATEGORIES.items():
        assert "->" in signature and registry.names(category), category
    assert "losses" not in CATEGORIES  # split: the prior's weightings are prior_losses


# ---------------------------------------------------------------------------------------------
# One contract per category: build every entry from a tiny config and run it
# ---------------------------------------------------------------------------------------------

TINY_VQGAN = VQGANConfig(img_size=16, nf=32, ch_mult=[1, 2], res_blocks=1, attn_resolutions=[], emb_dim=8,
                         codebook_size=16)


@pytest.mark.parametrize("name", registry.names("encoders"))
def test_encoder_contract(name):
    torch.manual_seed(0)
    z = registry.get("encoders", name)(TINY_VQGAN)(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert z.shape == (2, 8, 8, 8) and z.isfinite().all()


@pytest.mark.parametrize("name", registry.names("decoders"))
def test_decoder_contract(name):
    torch.manual_seed(0)
    x = registry.get("decoders", name)(TINY_VQGAN)(torch.randn(2, 8, 8, 8))
    assert x.shape == (2, 3, 16, 16) and x.isfinite().all()


@pytest.mark.parametrize("name", registry.names("quantizers"))
def test_quantizer_contract(name):
    torch.manual_seed(0)
    quantize = registry.get("quantizers", name)(TINY_VQGAN)
    z = torch.randn(2, 8, 8, 8)
    z_q, codes, _ = quantize(z)
    assert z_q.shape == z.shape and codes.shape == (2, 8, 8) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < TINY_VQGAN.codebook_size
    # each code is the nearest codebook vector: brute force over the K vectors
    book = quantize.lookup(torch.arange(TINY_VQGAN.codebook_size).view(1, -1, 1))[0, :, :, 0].T  # [K, D]
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.equal(codes.reshape(-1), torch.cdist(flat, book).argmin(1))


@pytest.mark.parametrize("name", registry.names("discriminators"))
def test_discriminator_contract(name):
    torch.manual_seed(0)
    logits = registry.get("discriminators", name)(DiscriminatorConfig(ndf=16, n_layers=2), in_channels=3)(
        torch.rand(2, 3, 32, 32))
    assert logits.ndim == 4 and logits.shape[:2] == (2, 1) and logits.isfinite().all()


@pytest.mark.parametrize("name", registry.names("prior_losses"))
def test_prior_loss_contract(name):
    """A weighting of the masked cross-entropy: [B] in, [B] out, finite, linear in ce."""
    T = N = 16
    ce = torch.tensor([2.0, 1.5, 0.5, 3.0])
    n_masked = torch.tensor([1, 8, 16, 4])
    t = torch.tensor([1, 8, 16, 4])
    loss = registry.get("prior_losses", name)
    out = loss(ce, n_masked, t, T, N)
    assert out.shape == (4,) and out.isfinite().all() and (out >= 0).all()
    torch.testing.assert_close(loss(2 * ce, n_masked, t, T, N), 2 * out)


def _tiny_prior():
    torch.manual_seed(0)
    cfg = PriorConfig(n_embd=32, n_head=2, n_layer=1, codebook_size=16, latent_shape=[4, 4])
    return cfg, registry.get("priors", "absorbing_transformer.v1")(cfg).eval()


@pytest.mark.parametrize("name", registry.names("priors"))
def test_prior_contract(name):
    torch.manual_seed(0)
    cfg = PriorConfig(n_embd=32, n_head=2, n_layer=1, codebook_size=16, latent_shape=[4, 4])
    net = registry.get("priors", name)(cfg).eval()
    x = torch.randint(0, 17, (3, 16))  # codes and the mask id K = 16
    with torch.no_grad():
        logits = net(x)
    assert logits.shape == (3, 16, 16) and logits.isfinite().all()


@pytest.mark.parametrize("name", registry.names("processes"))
def test_process_contract(name):
    """Every process builds from the recipe's sections, trains a network of its kind, and resumes."""
    causal = name == "autoregressive.v1"
    cfg = PriorConfig(n_embd=32, n_head=2, n_layer=1, codebook_size=16, latent_shape=[4, 4], causal=causal)
    process = registry.get("processes", name)(cfg, PriorTrainConfig())
    torch.manual_seed(0)
    net = registry.get("priors", cfg.name)(cfg)
    out = process.training_loss(net, torch.randint(0, 16, (3, 16)), generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert out["loss"].ndim == 0 and out["loss"].isfinite() and out["elbo"].isfinite()
    process.load_state_dict(process.state_dict())


@pytest.mark.parametrize("name", registry.names("samplers"))
def test_sampler_contract(name):
    """On a tiny prior: every mask id revealed with a valid code, known tokens kept."""
    cfg, net = _tiny_prior()
    k = cfg.codebook_size
    x = torch.randint(0, k, (4, 16))
    known = torch.rand(4, 16) < 0.5
    known[0] = False  # one all-masked grid
    x[~known] = k

    def predict(tokens):
        with torch.no_grad():
            return net(tokens)

    out, stats = run_chain(x, predict, sampler=name, mask_id=k, steps=8, temp=0.9, rng=SampleRNG(0, range(4)))
    assert out.shape == x.shape and (out != k).all() and int(out.min()) >= 0 and int(out.max()) < k
    assert torch.equal(out[known], x[known]) and stats["steps"] == 8


@pytest.mark.parametrize("name", registry.names("feature_extractors"))
def test_feature_extractor_contract(name, inception_weights):  # noqa: F811
    extract = registry.get("feature_extractors", name)(EvalConfig(inception_weights=str(inception_weights)), "cpu")
    torch.manual_seed(0)
    features = extract(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert features.ndim == 2 and features.shape[0] == 2 and features.isfinite().all()
    assert not torch.allclose(features[0], features[1])


def _png(path: Path, seed: int) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _stream_config(name: str, tmp_path: Path) -> DataConfig:
    """A tiny DataConfig for each stream entry; a new stream must add one here."""
    if name == "demo.v1":
        return DataConfig(source="demo", stream=name, demo_images=8)
    if name == "folder.v1":
        (tmp_path / "imgs").mkdir()
        for i in range(3):
            _png(tmp_path / "imgs" / f"im{i}.png", i)
        return DataConfig(source=str(tmp_path / "imgs"), stream=name)
    if name == "webdataset.v1":
        with tarfile.open(tmp_path / "data-000.tar", "w") as tar:
            for i in range(3):
                tar.add(_png(tmp_path / f"s{i}.png", i), arcname=f"s{i}.png")
        return DataConfig(source=str(tmp_path / "data-000.tar"), stream=name)
    raise AssertionError(f"no tiny config for the stream {name}; add one to _stream_config")


@pytest.mark.parametrize("name", registry.names("streams"))
def test_stream_contract(name, tmp_path):
    from uvq.data.streams import iterate_images

    cfg = _stream_config(name, tmp_path)
    registry.get("streams", name)(cfg)  # the entry builds from the config ...
    batches = list(iterate_images(cfg, 8, split="all", batch_size=2, rank=0, world_size=1))  # ... and is read
    images = torch.cat([b["image"] for b in batches])
    keys = [k for b in batches for k in b["key"]]
    assert images.shape[1:] == (3, 8, 8) and len(keys) == len(set(keys)) == images.shape[0] >= 3
    assert float(images.min()) >= 0 and float(images.max()) <= 1


# ---------------------------------------------------------------------------------------------
# Names in a recipe are resolved when it loads: config show, the dry run and the run fail alike
# ---------------------------------------------------------------------------------------------


def _uvq(args, capsys):
    from uvq.cli.app import main

    with pytest.raises(SystemExit) as info:
        main(list(args))
    cap = capsys.readouterr()
    return info.value.code, cap.out, cap.err


@pytest.mark.parametrize("override,message", [
    ("prior_train.loss=hinge.v1", "prior_train.loss: unknown prior_losses name 'hinge.v1'; valid names: elbo.v1, "
                                  "mlm.v1, reweighted_elbo.v1, reweighted_elbo_official.v1"),
    ("model.prior.name=patchgan.v1", "model.prior.name: unknown priors name 'patchgan.v1'"),
    ("sample.sampler=absorbing.v2", "sample.sampler: unknown samplers name 'absorbing.v2' (did you mean"),
    ("sample.options.top_k=0", "sample.options.top_k must be an integer >= 1"),
    ("canvas.options.choice_temp=3", "canvas.options.choice_temp is not an option of the sampler absorbing.v1; "
                                     "its options: order, top_k, top_p"),
])
def test_recipe_names_fail_at_load_the_same_way_everywhere(override, message, tmp_path, capsys):
    runs = [["config", "show", "demo", override],
            ["fit-prior", "demo", override, "--latents", str(tmp_path / "lat"), "--out", str(tmp_path / "p"),
             "--dry-run"],
            ["fit-prior", "demo", override, "--latents", str(tmp_path / "lat"), "--out", str(tmp_path / "p")],
            ["fit-vqgan", "demo", override, "--out", str(tmp_path / "v")]]
    lines = set()
    for args in runs:
        code, _, err = _uvq(args, capsys)
        errors = err.strip().splitlines()
        assert code == 2 and len(errors) == 1 and message in errors[0], (args, err)
        lines.add(errors[0])
    assert len(lines) == 1 and not any(tmp_path.iterdir())  # one line, and nothing written


def test_sampler_options_from_a_recipe_reach_the_sampler():
    cfg = load_config("demo", ["sample.sampler=maskgit_cosine.v1", "sample.options.choice_temp=2.5",
                               "sample.options.top_k=3"])
    assert cfg.sample.options == {"choice_temp": 2.5, "top_k": 3}
    with pytest.raises(UserError, match="sample.options must be a mapping"):
        load_config("demo", ["sample.options=3"])


# ---------------------------------------------------------------------------------------------
# `uvq ls`: a snapshot of names and where each is defined (module:qualname, no line numbers)
# ---------------------------------------------------------------------------------------------


def _ls_rows(capsys) -> list[str]:
    code, out, err = _uvq(["ls", "--json"], capsys)
    assert code == 0, err
    return [f"{r['category']} {r['name']} {r['where'].split(' (')[0]}" for r in json.loads(out)["components"]]


def test_uvq_ls_snapshot(capsys):
    rows = _ls_rows(capsys)
    if os.environ.get("UVQ_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text("\n".join(rows) + "\n")
    assert rows == SNAPSHOT.read_text().splitlines(), (
        "uvq ls changed; if that is intended, rerun with UVQ_UPDATE_SNAPSHOTS=1 and commit tests/snapshots/uvq-ls.txt")


def test_every_registry_name_field_of_a_recipe_is_resolved():
    """Each recipe field whose default is a registered name is in CONFIG_NAMES (or a sampler section)."""
    import dataclasses

    from uvq.config import Config
    from uvq.registry import CONFIG_NAMES, SAMPLER_SECTIONS

    registry.load()
    names = {n for c in CATEGORIES for n in registry.names(c)}

    def walk(obj, path):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{path}{f.name}.")
            elif isinstance(value, str) and value in names:
                yield f"{path}{f.name}"

    listed = {p for p, _ in CONFIG_NAMES} | {f"{s}.sampler" for s in SAMPLER_SECTIONS}
    found = set(walk(Config(), ""))
    assert found and found <= listed
