"""The registry: versioned names, clear lookup errors, entry-point plugins, and a contract for every entry."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import textwrap

import pytest

from uvq.registry import CATEGORIES, ENTRY_POINT_GROUP, Registry, registry
from uvq.runtime import UserError


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


def test_every_builtin_entry_honours_the_contract():
    """Every registered component: a versioned name, a callable with a docstring or a signature we can show."""
    registry.load()
    entries = registry.entries()
    assert entries, "uvq registers no components"
    seen = set()
    for e in entries:
        assert e.category in CATEGORIES
        assert (e.category, e.name) not in seen
        seen.add((e.category, e.name))
        assert callable(e.func)
        assert inspect.signature(e.func) is not None
        assert e.where.split(":")[0].startswith("uvq"), e.where
        assert ".py:" in e.where  # `uvq ls` can show the file and line


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


def test_builtin_modules_exist():
    from uvq.registry import BUILTIN_MODULES

    for name in BUILTIN_MODULES:
        importlib.import_module(name)
