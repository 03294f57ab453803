"""The README's commands, exactly as written, on a shrunk copy of the demo recipe.

The commands are read from README.md itself and run, so the README cannot drift from what works. They
run in a scratch directory whose `recipes/demo.yaml` is the real demo recipe with tiny step
counts (the real budget is the README's main job, timed in the closing notes, not here).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_uvq, run_uvq_process


def _block_after(marker: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    after = text.split(marker, 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", after, re.S).group(1)
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def _shrunk_demo(cwd: Path) -> None:
    cfg = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    cfg["data"]["demo_images"] = 48
    cfg["train"].update(steps=3, disc_start_step=2, batch_size=4)
    cfg["prior_train"].update(steps=3, batch_size=8, warmup_steps=1, val_every=2, val_batches=1)
    cfg["sample"].update(n=4, steps=8, batch_size=4)
    cfg["run"].update(log_every=1, image_every=2, ckpt_every=2)
    (cwd / "recipes").mkdir()
    (cwd / "recipes" / "demo.yaml").write_text(yaml.safe_dump(cfg))


def _uvq_args(command: str) -> list[str]:
    words = shlex.split(command)
    assert Path(words[0]).name == "uvq", command
    return words[1:]


@pytest.mark.parametrize("which", ["main", "stages"])
def test_readme_demo_commands_run_as_written(tmp_path, which):
    _shrunk_demo(tmp_path)
    if which == "main":
        main = _block_after("<!-- main-command -->")
        assert len(main) == 1
        parts = [p.strip() for p in main[0].split("&&")]
        assert parts[0].startswith("python3 -m venv") and "pip install -e" in parts[1]
        commands = parts[2:]
    else:
        commands = _block_after("<!-- demo-stages -->")
    assert commands
    # The main command runs as a user runs it, in its own process; the stages run in this one.
    runner = run_uvq_process if which == "main" else run_uvq
    for command in commands:
        out = runner(*_uvq_args(command), cwd=tmp_path)
        assert out.returncode == 0, f"{command}\n{out.stderr[-3000:]}"
    if which == "main":
        assert "grid" in (out.stdout + out.stderr)
        assert list((tmp_path / "runs" / "demo").rglob("grid.png"))
    else:
        assert list((tmp_path / "samples" / "demo").glob("sample-*.png"))
