"""`uvq app` (docs/app.md): the real app in a subprocess, driven by a real headless Chromium.

The models are a tiny prior and VQGAN pair with real checkpoints (tests/test_canvas.py's
`make_pair`: 16x16 images, 8x8 latents). The browser loads the page, samples 2 images,
inpaints an uploaded image inside a box with compositing (the known pixels must come back
unchanged), sends a box outside the image (a message on the page; the server goes on) while
a second request waits in the queue, and draws a canvas. `UVQ_UPDATE_SCREENSHOTS=1` copies
the screenshots it takes into docs/images/app-*.png.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_uvq
from PIL import Image
from test_canvas import make_pair

TIMEOUT = 90  # seconds for one request to come back on this shared CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`uvq app` over a tiny pair, as a user starts it; stopped with SIGTERM at the end."""
    root = tmp_path_factory.mktemp("app")
    make_pair(root / "runs" / "demo")
    port = _free_port()
    log = open(root / "app.log", "w")  # noqa: SIM115 (closed below)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "uvq", "app", "--run-dir", str(root / "runs" / "demo"),
                             "--port", str(port), "--out", str(root / "out"), "--device", "cpu"],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            _get(url)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("uvq app did not start:\n" + (root / "app.log").read_text())
            time.sleep(0.5)
    try:
        yield {"url": url, "out": root / "out", "root": root, "proc": proc}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        finally:
            proc.kill()
            log.close()
        text = (root / "app.log").read_text()
        assert code == 143, text  # an interruption never exits 0
        assert "error: interrupted by SIGTERM; the app stopped" in text
        assert "serving on " + url in text


# ---------------------------------------------------------------------------------------------
# The page, through the browser
# ---------------------------------------------------------------------------------------------


def _by(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def _wait(driver, condition, what: str, timeout: float = TIMEOUT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d), message=what)


def _type(driver, css: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    field = _wait(driver, lambda d: (_by(d, css) or [None])[0], css)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.BACKSPACE)
    field.send_keys(text)
    field.send_keys(Keys.TAB)


def _click(driver, css: str) -> None:
    _wait(driver, lambda d: (_by(d, css) or [None])[0], css).click()


def _tab(driver, name: str) -> None:
    buttons = [b for b in _by(driver, "button[role=tab]") if b.text.strip() == name]
    assert buttons, f"no tab {name}"
    buttons[0].click()


def _images(driver, gallery: str) -> list[str]:
    return [img.get_attribute("src") for img in _by(driver, f"#{gallery} img") if img.get_attribute("src")]


def _wait_images(driver, gallery: str, n: int, old: tuple[str, ...] = ()) -> list[np.ndarray]:
    """The n images the gallery shows (new ones, not `old`), fetched from the server as the page does."""
    srcs = _wait(driver, lambda d: (s := _images(d, gallery)) and len(s) >= n and not set(s) & set(old) and s,
                 f"{n} images in #{gallery}")
    return [np.asarray(Image.open(io.BytesIO(_get(src)))) for src in dict.fromkeys(srcs)][:n]


def _upload(driver, editor: str, path: Path) -> None:
    """Give the ImageEditor a file through its file input; again if the editor was not ready yet
    (a tab's components are built when it is first shown)."""
    from selenium.common.exceptions import TimeoutException

    for _ in range(2):
        field = _wait(driver, lambda d: (_by(d, f"{editor} input[type=file]") or [None])[0], "the editor")
        field.send_keys(str(path))
        try:
            _wait(driver, lambda d: "Upload an image" not in _by(d, editor)[0].text, "the upload", timeout=45)
            return
        except TimeoutException:
            continue
    pytest.fail(f"the editor {editor} did not take {path}: {_by(driver, editor)[0].text!r}")


def _toast(driver) -> str:
    return " ".join(t.text for t in _by(driver, "[data-testid='toast-body']"))


def _shot(driver, tmp_path: Path, name: str) -> None:
    """A screenshot, palette-reduced to stay small; copied into docs/images with UVQ_UPDATE_SCREENSHOTS=1."""
    _wait(driver, lambda d: d.execute_script(
        "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"), "every image rendered")
    path = tmp_path / f"app-{name}.png"
    Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB").quantize(64).save(path, optimize=True)
    if os.environ.get("UVQ_UPDATE_SCREENSHOTS") == "1":
        shutil.copy(path, REPO / "docs" / "images" / path.name)


def test_the_app_in_a_browser(served, browser, tmp_path):
    url, out = served["url"], served["out"]
    browser.get(url)
    _wait(browser, lambda d: _by(d, "#sample-go"), "the page")
    assert browser.title == "uvq"

    # Sample: 2 images of the VQGAN's size, the same files (and provenance) as `uvq sample` writes.
    _type(browser, "#sample-count input", "2")
    _click(browser, "#sample-go")
    samples = _wait_images(browser, "sample-gallery", 2)
    assert [s.shape[:2] for s in samples] == [(16, 16), (16, 16)]
    record = json.loads((out / "sample-0001" / "samples.json").read_text())
    assert record["command"] == "sample" and record["n"] == 2 and record["seed"] == 0
    assert record["prior"]["path"].endswith("step-00000020")
    written = [np.asarray(Image.open(out / "sample-0001" / f"sample-{i:06d}.png")) for i in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(samples, written, strict=True))
    files = _wait(browser, lambda d: _by(d, "#sample-files a"), "download links")
    assert {a.get_attribute("href").rsplit("/", 1)[-1] for a in files} >= {"sample-000000.png", "sample-000001.png",
                                                                           "samples.json"}
    _shot(browser, tmp_path, "sample")

    # Inpaint: upload an image, a box over its left half, 2 composited completions.
    pixels = (np.arange(16 * 16 * 3).reshape(16, 16, 3) * 7 % 251).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "input.png")
    _tab(browser, "Inpaint")
    _upload(browser, "#inpaint-editor", tmp_path / "input.png")
    _type(browser, "#inpaint-boxes textarea", "0,0,8,16")
    _type(browser, "#inpaint-count input", "2")
    _click(browser, "#inpaint-composite input")
    _click(browser, "#inpaint-go")
    done = _wait_images(browser, "inpaint-gallery", 2)
    assert [c.shape[:2] for c in done] == [(16, 16), (16, 16)]
    for completion in done:
        assert np.array_equal(completion[:, 8:, :3], pixels[:, 8:])  # the known pixels, unchanged
    grid = _wait(browser, lambda d: [i.get_attribute("src") for i in _by(d, "#inpaint-grid img")], "the grid")
    side = np.asarray(Image.open(io.BytesIO(_get(grid[0]))))
    assert side.shape[1] > 3 * side.shape[0]  # original, mask and 2 completions in a row
    record = json.loads((out / "inpaint-0001" / "out" / "inpaint.json").read_text())
    assert record["composite"] is True and record["inputs"][0]["masked_latents"] == 32
    _shot(browser, tmp_path, "inpaint")

    # A box outside the image: a message on the page, and a sample asked for meanwhile is queued, not lost.
    _type(browser, "#inpaint-boxes textarea", "0,0,99,99")
    _click(browser, "#inpaint-go")
    _wait(browser, lambda d: "outside" in _toast(d) or "exceeds" in _toast(d), "the error message")
    assert not (out / "inpaint-0002").exists()  # a refused request leaves nothing
    _tab(browser, "Sample")
    _type(browser, "#sample-seed input", "1")
    _click(browser, "#sample-go")
    _tab(browser, "Canvas")
    _type(browser, "#canvas-height input", "16")
    _type(browser, "#canvas-width input", "32")
    _type(browser, "#canvas-stride input", "4")
    _click(browser, "#canvas-go")
    canvases = _wait_images(browser, "canvas-gallery", 1)
    assert canvases[0].shape[:2] == (16, 32)
    windows = _wait_images(browser, "canvas-windows", 3)
    assert [w.shape[:2] for w in windows] == [(16, 16)] * 3  # 8x16 latents, 8x8 windows at stride 4
    assert np.array_equal(windows[1], canvases[0][:, 8:24])
    _shot(browser, tmp_path, "canvas")
    assert json.loads((out / "sample-0002" / "samples.json").read_text())["seed"] == 1  # the queued request ran
    # Nothing on the page came from anywhere but the app.
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(url) or u.startswith(("data:", "blob:")) for u in loaded), loaded


# ---------------------------------------------------------------------------------------------
# The command, before any page: refusals and the missing extra
# ---------------------------------------------------------------------------------------------


def test_a_missing_gradio_is_one_line(tmp_path):
    shadow = tmp_path / "shadow" / "gradio"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named gradio')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "uvq", "app", "--prior", str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: `uvq app` needs gradio (No module named gradio): pip install 'uvq[app]'"]


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    make_pair(tmp_path / "runs" / "demo")
    run = str(tmp_path / "runs" / "demo")
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("a user's file")
    cases = {
        ("--port", "0"): "--port must be between 1 and 65535",
        ("sample.temp=0",): "temp",
        ("model.prior.n_layer=2",): "takes sample., inpaint. or canvas.KEY=VALUE",
        ("--out", str(foreign)): "not made by uvq",
    }
    for args, message in cases.items():
        result = run_uvq("app", "--run-dir", run, *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1, result.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["mine.txt"]


def test_the_editor_value_gives_the_image_and_the_painted_region():
    from uvq.webapp import editor_image_and_mask

    background = np.zeros((4, 6, 4), np.uint8)
    background[..., :3] = 9
    background[..., 3] = 255
    layer = np.zeros((4, 6, 4), np.uint8)
    layer[1:3, 2:5] = (255, 0, 255, 128)  # a stroke, half transparent
    image, mask = editor_image_and_mask({"background": background, "layers": [layer], "composite": background})
    assert image.shape == (4, 6, 3) and (image == 9).all()
    expected = np.zeros((4, 6), bool)
    expected[1:3, 2:5] = True
    assert np.array_equal(mask, expected)
    assert editor_image_and_mask(None) == (None, None)
