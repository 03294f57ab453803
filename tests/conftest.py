"""Shared test fixtures: paths, small configs, and a CLI runner that goes through `uvq.cli.app.main`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # see tests/fixtures/README.md

# Keep CPU tests deterministic and polite on small machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def fixtures_dir() -> Path:
    """The parity fixtures; a missing one fails the test instead of skipping it."""
    for sub in ("official", "taming"):
        if not (FIXTURES / sub).is_dir():
            pytest.fail(f"parity fixtures missing: {FIXTURES / sub} (see tests/fixtures/README.md)")
    return FIXTURES


def run_uvq(*args: str, cwd: str | Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `uvq` entry point in a subprocess (as a user would), capturing output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "uvq", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def uvq_cli():
    return run_uvq
