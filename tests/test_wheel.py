"""A package that installs whole: build the wheel, install it into a fresh virtual environment
(non-editable), and run `uvq config show demo` and a tiny `uvq fit-vqgan demo` from a directory
with no `recipes/` folder and no source tree on the path.

The new environment gets its dependencies (torch, ...) from the interpreter running the tests:
a `.pth` file in its site-packages names the running interpreter's site-packages, so nothing is
downloaded. The wheel's own `uvq` sits first on the path, ahead of any uvq installed there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_VQGAN = [
    "model.vqgan.img_size=16", "model.vqgan.ch_mult=[1,2]", "model.vqgan.attn_resolutions=[8]",
    "model.vqgan.emb_dim=8", "model.vqgan.codebook_size=16", "model.discriminator.ndf=8",
    "model.discriminator.n_layers=1", "model.prior.codebook_size=16", "model.prior.latent_shape=[8,8]",
    "data.demo_images=16", "train.batch_size=2", "train.steps=2", "train.disc_start_step=1",
    "run.log_every=1", "run.image_every=2", "run.ckpt_every=2",
    "run.seed=2147483647",  # the largest seed config accepts (uvq.config.SEED_MAX) trains too
]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, clean environment, empty working directory) with the built wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    # Build from a copy, so that setuptools' build/ and *.egg-info never land in the repository.
    src = root / "src"
    shutil.copytree(REPO / "uvq", src / "uvq", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  "-w", str(root / "dist"), str(src)], root, env)
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("uvq-*.whl")
    # A fresh environment without pip; the running interpreter's pip installs into it.
    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    assert made.returncode == 0, made.stderr
    py = venv / "bin" / "python"
    put = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                str(wheel)], root, env)
    assert put.returncode == 0, put.stderr
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env)
    deps = sysconfig.get_paths()["purelib"]  # the running interpreter's: torch, typer, ...
    (Path(site.stdout.strip()) / "uvq-test-deps.pth").write_text(deps + "\n")
    cwd = root / "work"
    cwd.mkdir()
    return {"venv": venv, "env": env, "cwd": cwd, "wheel": wheel}


def test_wheel_carries_the_recipes(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    shipped = sorted(n for n in names if n.startswith("uvq/recipes/"))
    assert shipped == sorted(f"uvq/recipes/{p.name}" for p in (REPO / "uvq" / "recipes").glob("*.yaml"))
    assert "uvq/recipes/demo.yaml" in shipped


def test_installed_uvq_is_the_wheel_not_the_source_tree(installed):
    venv, env, cwd = installed["venv"], installed["env"], installed["cwd"]
    res = _run([str(venv / "bin" / "python"), "-c", "import uvq, uvq.config as c; print(uvq.__file__); "
                "print(','.join(c.recipe_names()))"], cwd, env)
    assert res.returncode == 0, res.stderr
    where, names = res.stdout.split()
    assert Path(where).is_relative_to(venv) and "demo" in names.split(",")
    assert not (cwd / "recipes").exists()


def test_installed_config_show_and_tiny_fit_vqgan(installed):
    venv, env, cwd = installed["venv"], installed["env"], installed["cwd"]
    uvq = str(venv / "bin" / "uvq")
    shown = _run([uvq, "config", "show", "demo", "--json"], cwd, env)
    assert shown.returncode == 0, shown.stderr
    cfg = json.loads(shown.stdout)
    assert cfg["model"]["vqgan"]["img_size"] == 32 and cfg["model"]["vqgan"]["codebook_size"] == 64
    # A path is a path: without a recipes/ folder here, recipes/demo.yaml is an error, not the packaged demo.
    missing = _run([uvq, "config", "show", "recipes/demo.yaml"], cwd, env)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    out = cwd / "run"
    fit = _run([uvq, "fit-vqgan", "demo", *TINY_VQGAN, "--out", str(out), "--device", "cpu"], cwd, env)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert (out / "config.yaml").is_file() and list(out.glob("**/*.safetensors"))
    assert not (cwd / "recipes").exists()
