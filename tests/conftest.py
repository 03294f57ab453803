"""Shared test fixtures: paths, small configs, and a CLI runner that goes through `uvq.cli.app.main`."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
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


def run_uvq(*args: str, cwd: str | Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `uvq` entry point (`uvq.cli.app.main`) in this process, as `python -m uvq` would.

    stdout and stderr are captured, the exit status is the SystemExit code (an exception that
    escapes, as with --debug, is status 1 with its traceback on stderr, as Python prints it), and
    `cwd` and `env` are set for the call and restored after. The result has the fields of a
    subprocess.CompletedProcess, so a test reads it like one.
    """
    from uvq.cli.app import main

    saved_cwd, saved_env = os.getcwd(), dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(env or {})
    os.chdir(cwd or REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["uvq", *args], code, out.getvalue(), err.getvalue())


def run_uvq_process(*args: str, cwd: str | Path | None = None, env: dict | None = None,
                    timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m uvq` in a subprocess: for the few tests that need a real process (signals,
    start-up imports, the README's main command)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "uvq", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def uvq_cli():
    return run_uvq


def _chromium() -> tuple[str, str] | None:
    """Debian's chromium and chromium-driver (installed by .ci/run), or None."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def browser(tmp_path):
    """A real headless Chromium driven by Selenium (docs/app.md, docs/reports.md).

    Skips with the install line where the browser or its driver is missing: .ci/run installs
    both (`apt-get install -y chromium chromium-driver`).
    """
    found = _chromium()
    if found is None:
        pytest.skip("no chromium/chromedriver: apt-get install -y chromium chromium-driver")
    selenium = pytest.importorskip("selenium", reason="selenium missing: pip install -e '.[dev]'")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    del selenium
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()
