"""The CLI's contract: version, config show, ls, one-line errors with exit codes, --json."""

from __future__ import annotations

import json

from conftest import run_uvq

from uvq import __version__


def test_version():
    out = run_uvq("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"uvq {__version__}"


def test_config_show_resolves_and_validates():
    out = run_uvq("config", "show", "recipes/demo.yaml", "train.batch_size=3")
    assert out.returncode == 0, out.stderr
    assert "batch_size: 3" in out.stdout
    js = run_uvq("--json", "config", "show", "demo", "train.batch_size=5")
    assert json.loads(js.stdout)["train"]["batch_size"] == 5
    # --json may also follow the subcommand
    js2 = run_uvq("config", "show", "demo", "--json")
    assert json.loads(js2.stdout)["model"]["vqgan"]["img_size"] == 32


def test_user_errors_are_one_line_and_exit_2():
    out = run_uvq("config", "show", "demo", "train.batchsize=3")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        out.stderr.strip().splitlines()[0]] and "did you mean 'train.batch_size'" in out.stderr
    assert "Traceback" not in out.stderr
    bad_flag = run_uvq("config", "show", "demo", "--no-such-flag")
    assert bad_flag.returncode == 2 and "Traceback" not in bad_flag.stderr


def test_debug_shows_traceback():
    out = run_uvq("--debug", "config", "show", "demo", "train.batchsize=3")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_ls_lists_components_with_locations():
    out = run_uvq("--json", "ls")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["components"]
    assert rows, "no registered components"
    for row in rows:
        assert row["name"].rsplit(".", 1)[-1].startswith("v")
        assert ".py:" in row["where"]
