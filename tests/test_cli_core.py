"""The CLI's contract: version, config show, ls, one-line errors with exit codes, --json, help,
start-up imports, and the exit codes of interrupted commands."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_uvq

from uvq import __version__
from uvq.cli.app import PANELS, build_command, hint_for
from uvq.errors import EXIT_REQUEUE


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


# ---------------------------------------------------------------------------------------------
# Start-up: --help and --version import neither torch nor numpy (a real process: a fresh sys.modules)
# ---------------------------------------------------------------------------------------------


def test_help_version_and_a_typo_import_no_torch():
    code = (
        "import json, sys\n"
        "from uvq.cli.app import main\n"
        "codes = []\n"
        "for args in (['--help'], ['--version'], ['fit-vqgan', '--help'], ['fitvqgan']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as exc:\n"
        "        codes.append(exc.code)\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'PIL', 'webdataset') if m in sys.modules)\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy}), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result == {"codes": [0, 0, 0, 2], "heavy": []}, proc.stderr


# ---------------------------------------------------------------------------------------------
# Help: grouped, no value type on flags; one-line interruption hints name real options
# ---------------------------------------------------------------------------------------------


def _leaf_commands(command, path=()):
    subs = getattr(command, "commands", None)
    if not subs:
        yield path, command
        return
    for name, sub in subs.items():
        yield from _leaf_commands(sub, (*path, name))


def test_top_level_help_is_grouped_in_panels():
    out = run_uvq("--help")
    assert out.returncode == 0, out.stderr
    panels = [line.split("─ ", 1)[1].split(" ", 1)[0] for line in out.stdout.splitlines() if line.startswith("╭─ ")]
    assert panels == ["Options", *PANELS]
    top = build_command()
    assert sorted(top.commands) == sorted(name for names in PANELS.values() for name in names)


def test_flags_show_no_value_type_in_any_help():
    paths = [path for path, _ in _leaf_commands(build_command())]
    assert len(paths) > 15
    for path in [(), *paths]:
        out = run_uvq(*path, "--help", env={"COLUMNS": "200"})
        assert out.returncode == 0, (path, out.stderr)
        assert "<bool>" not in out.stdout, path
    assert "--overwrite" in run_uvq("sample", "--help").stdout


def test_interruption_hints_name_only_options_the_command_has():
    for path, command in _leaf_commands(build_command()):
        hint = hint_for(path)
        named = set(re.findall(r"--[a-z][a-z-]*", hint))
        has = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}
        assert named <= has, (path, named - has)


def test_unsupported_devices_are_refused_with_one_line(tmp_path):
    for device in ("mps", "meta", "gpu", "cuda:x"):
        out = run_uvq("fit-vqgan", "demo", "--dry-run", "--device", device, "--out", str(tmp_path / "run"))
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines() == [f"error: --device {device!r} is not supported; use auto, cpu, "
                                                   "cuda or cuda:N"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Interruptions: SIGINT exits 130 and SIGTERM 143, with one line, for every long command
# (real processes receiving real signals mid-run)
# ---------------------------------------------------------------------------------------------

TINY_VQGAN = ["model.vqgan.img_size=16", "model.vqgan.ch_mult=[1,2]", "model.vqgan.attn_resolutions=[]",
              "model.vqgan.emb_dim=8", "model.vqgan.codebook_size=16", "model.discriminator.ndf=8",
              "model.discriminator.n_layers=1", "model.prior.codebook_size=16", "model.prior.latent_shape=[8,8]",
              "data.demo_images=64", "train.batch_size=2", "train.steps=100000", "run.log_every=1"]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from test_canvas import make_pair

    return make_pair(tmp_path_factory.mktemp("pair"))


def _long_command(which: str, tmp_path: Path, pair) -> list[str]:
    vq_ckpt, prior_ckpt = pair
    return {
        "fit-vqgan": ["fit-vqgan", "demo", *TINY_VQGAN, "--out", str(tmp_path / "out")],
        "pipeline": ["pipeline", "demo", *TINY_VQGAN, "--out", str(tmp_path / "out")],
        "encode": ["encode", "--vqgan", str(vq_ckpt), "--data", "demo", "data.demo_images=100000", "--batch-size", "2",
                   "--out", str(tmp_path / "out")],
        "sample": ["sample", "--prior", str(prior_ckpt), "-n", "100000", "--batch-size", "1",
                   "--out", str(tmp_path / "out")],
    }[which]


def _default_sigint() -> None:
    # A test runner started in the background may ignore SIGINT; a user's shell does not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("which", ["fit-vqgan", "encode", "sample", "pipeline"])
def test_an_interrupted_command_never_exits_0(tmp_path, tiny_pair, which, signum):
    args = ["--json", *_long_command(which, tmp_path, tiny_pair), "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "uvq", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    lines = []
    try:
        for line in proc.stderr:  # progress events, one JSON line each: wait until the work is under way
            lines.append(line)
            if '"event": "advance"' in line:
                proc.send_signal(signum)
                break
        rest = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert any('"event": "advance"' in line for line in lines), "".join(lines)
    # Each of these loops stops after its step, batch or shard with its state saved: exit 75 (uvq.stopping).
    assert proc.returncode == EXIT_REQUEUE, rest
    errors = [line for line in rest.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: stopped") and signal.Signals(signum).name in errors[0]
    assert "Traceback" not in rest
    if which != "encode":  # encode's open shard stays as a `.tmp` that readers ignore (issue 11, finding 9)
        assert not list((tmp_path / "out").rglob("*.tmp")), "an atomic write left its temporary file"
