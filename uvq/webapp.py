"""`uvq app`: a local web app over a prior and its VQGAN (docs/app.md).

Three tabs (Sample, Inpaint, Canvas) over the file-to-file calls of the front door (docs/api.md):
`write_samples`, `inpaint_images` and `upscale_canvas`. Each request writes one numbered
directory under the app's output directory with the same files and provenance as the command
(`samples.json`, `inpaint.json`), which the page offers for download. The app adds no sampling
code of its own: what the page shows is what `uvq sample`, `uvq inpaint` and `uvq upscale-canvas`
write for the same settings and seed.

Gradio (https://www.gradio.app) is the field's convention for such demos (Halton-MaskGIT's app,
diffusers' demos); it is the optional extra `uvq[app]` and only the `uvq app` command imports
this module. The page loads nothing from the network: analytics are off and the theme names
local font stacks only (the default theme's fonts come from Google Fonts).

Requests run one at a time on the one model (a shared concurrency group of size 1); a request
made while another runs waits in gradio's queue. A UserError becomes a message on the page
(`gr.Error`), and the server keeps running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image

from uvq.errors import UserError
from uvq.files import MARKER
from uvq.images import save_png
from uvq.progress import ProgressFn, null_progress

CONCURRENCY = "model"  # the one queue that every generating event joins
MAX_WINDOWS_SHOWN = 32  # the canvas tab shows at most this many of the canvas's windows
REQUEST_PATTERNS = ("sample-*", "inpaint-*", "canvas-*")  # what the app writes under its --out


@dataclasses.dataclass
class Served:
    """What the app serves: a checked prior and VQGAN pair and the resolved sections of its recipe.

    The sections are the defaults the page starts from (the prior's recipe with the command's
    `section.key=value` overrides, resolved by the CLI as for `uvq sample`).
    """

    prior: Path  # the prior checkpoint directory
    vqgan: Path  # the VQGAN checkpoint directory (the prior's tokenizer, or --vqgan)
    sample: Any  # uvq.config.SampleConfig
    inpaint: Any  # uvq.config.InpaintConfig
    canvas: Any  # uvq.config.CanvasConfig
    out: Path  # the app's output directory: one numbered directory per request
    weights: str = "default"
    device: str = "auto"
    image_size: int = 0  # the VQGAN's image side in pixels
    downsample: int = 1  # the VQGAN's factor f
    window: tuple[int, int] = (1, 1)  # the prior's latent grid (h, w)
    samplers: tuple[str, ...] = ()


class Studio:
    """The three requests as plain functions (the page calls them; so can a test or a notebook).

    Each takes the page's values, validates them through the library call it makes, and returns
    paths under a new request directory `out/<kind>-NNNN`.
    """

    def __init__(self, served: Served) -> None:
        self.served = served
        self._lock = threading.Lock()

    # one directory per request -------------------------------------------------------------
    @contextlib.contextmanager
    def _request(self, kind: str):
        """A new directory out/<kind>-NNNN for one request; removed again when the request is
        refused before the library call claimed its output (a refused request leaves nothing)."""
        with self._lock:
            taken = [int(m.group(1)) for p in self.served.out.glob(f"{kind}-*")
                     if (m := re.fullmatch(rf"{kind}-(\d+)", p.name))]
            path = self.served.out / f"{kind}-{max(taken, default=0) + 1:04d}"
            path.mkdir()
        try:
            yield path
        except BaseException:
            if not any(p.name == MARKER for p in path.rglob(MARKER)):
                shutil.rmtree(path, ignore_errors=True)
            raise

    def _sampler(self, sampler: str | None, section: Any) -> tuple[str, dict[str, Any]]:
        """The sampler asked for, with the section's options when it is the section's own
        sampler, and that sampler's defaults otherwise."""
        sampler = sampler or section.sampler
        return sampler, dict(section.options) if sampler == section.sampler else {}

    # Sample -----------------------------------------------------------------------------------
    def sample(self, *, n: int, steps: int | None, temp: float, sampler: str | None, seed: int,
               progress: ProgressFn = null_progress) -> dict[str, Any]:
        """n samples: returns {"images": [png paths], "files": [pngs + samples.json], "summary"}."""
        from uvq.sampling.outputs import SAMPLES_JSON, write_samples

        s = self.served
        name, options = self._sampler(sampler, s.sample)
        cfg = dataclasses.replace(s.sample, n=_count(n, "count"), steps=_steps(steps), temp=_number(temp, "temperature"),
                                  sampler=name, options=options)
        with self._request("sample") as out:
            summary = write_samples(s.prior, out, vqgan=s.vqgan, seed=_seed(seed), weights=s.weights,
                                    device=s.device, progress=progress, **dataclasses.asdict(cfg))
        images = sorted(out.glob("sample-*.png"))
        return {"images": images, "files": [*images, out / SAMPLES_JSON], "summary": summary}

    # Inpaint ----------------------------------------------------------------------------------
    def inpaint(self, *, image: np.ndarray | None, mask: np.ndarray | None, boxes: list[str], n: int,
                temp: float, composite: bool, seed: int, progress: ProgressFn = null_progress) -> dict[str, Any]:
        """n completions of `image` (uint8 [H, W, 3]) where `mask` (bool [H, W], painted) or the
        `boxes` ("x0,y0,x1,y1" in the image's pixels) are set. Returns {"grid": original, mask and
        completions side by side, "images": [completions], "files", "summary"}."""
        from uvq.sampling.inpaint import inpaint_images

        s = self.served
        if image is None:
            raise UserError("no image to inpaint: upload one, or take a sample with 'Edit the first sample'")
        painted = mask is not None and bool(mask.any())
        if not painted and not boxes:
            raise UserError("nothing to regenerate: paint the region with the brush, or give a box x0,y0,x1,y1")
        cfg = s.inpaint
        name, options = self._sampler(None, cfg)
        n, temp, seed = _count(n, "completions"), _number(temp, "temperature"), _seed(seed)
        with self._request("inpaint") as req:
            # the page's image and painted region, as the files `uvq inpaint IMAGE --mask PNG` reads
            (req / "input").mkdir()
            image_path = req / "input" / "image.png"
            save_png(torch.from_numpy(image).permute(2, 0, 1).float() / 255, image_path)
            mask_path = None
            if painted:
                mask_path = req / "input" / "mask.png"
                save_png(torch.from_numpy(mask).float()[None].expand(3, -1, -1), mask_path)
            summary = inpaint_images(
                s.prior, image_path, req / "out", mask=mask_path, boxes=list(boxes), vqgan=s.vqgan, n=n,
                steps=cfg.steps, temp=temp, seed=seed, dilate_latents=cfg.dilate, composite_pixels=bool(composite),
                feather_px=cfg.feather if composite else 0, stride=cfg.stride, windows=cfg.windows,
                batch_windows=cfg.batch_windows, sampler=name, options=options, weights=s.weights,
                allow_other_vqgan=cfg.allow_other_vqgan, device=s.device, precision=cfg.precision,
                max_memory_gb=cfg.max_memory_gb, progress=progress)
        record = summary["inputs"][0]
        images = [req / "out" / f for f in record["files"]]
        return {"grid": req / "out" / record["grid"], "images": images,
                "files": [*images, req / "out" / record["grid"], req / "out" / "inpaint.json"], "summary": summary}

    # Canvas -----------------------------------------------------------------------------------
    def canvas(self, *, height: int, width: int, stride: int, wrap: bool, n: int, steps: int | None, temp: float,
               seed: int, progress: ProgressFn = null_progress) -> dict[str, Any]:
        """n canvases of height x width pixels (Eq. 8). Returns {"images", "windows": the first
        canvas cut into its training-sized windows [(uint8 [h f, w f, 3], caption)], "files",
        "summary"}."""
        from uvq.sampling.canvas import make_windows, upscale_canvas
        from uvq.sampling.outputs import SAMPLES_JSON

        s = self.served
        cfg = dataclasses.replace(s.canvas, size=[_count(height, "height"), _count(width, "width")], latent_size=None,
                                  stride=_count(stride, "stride"), wrap=bool(wrap), n=_count(n, "count"),
                                  steps=_steps(steps), temp=_number(temp, "temperature"))
        with self._request("canvas") as req:
            summary = upscale_canvas(s.prior, req, vqgan=s.vqgan, seed=_seed(seed), weights=s.weights,
                                     device=s.device, progress=progress, **dataclasses.asdict(cfg))
        images = sorted(req.glob("sample-*.png"))
        latents = tuple(summary["canvas"]["latents"])
        geometry = make_windows(latents, s.window, cfg.stride, cfg.wrap)
        first = np.asarray(Image.open(images[0]).convert("RGB"))  # [H, W, 3]
        f, (h, w) = s.downsample, s.window
        windows = []
        for top, left in geometry.offsets.tolist()[:MAX_WINDOWS_SHOWN]:
            rows = (np.arange(h * f) + top * f) % first.shape[0]  # wrapped windows run over the edge
            cols = (np.arange(w * f) + left * f) % first.shape[1]
            windows.append((first[rows][:, cols], f"window at latent ({top}, {left})"))
        return {"images": images, "windows": windows, "n_windows": len(geometry),
                "files": [*images, req / SAMPLES_JSON], "summary": summary}


# ---------------------------------------------------------------------------------------------
# The page's values: gradio hands numbers over as floats (or None for an empty field)
# ---------------------------------------------------------------------------------------------


def _number(value: float | None, what: str) -> float:
    if value is None:
        raise UserError(f"give a value for the {what}")
    return float(value)


def _count(value: float | None, what: str) -> int:
    value = _number(value, what)
    if value != int(value) or value < 1:
        raise UserError(f"the {what} must be a whole number >= 1 (got {value:g})")
    return int(value)


def _steps(value: float | None) -> int | None:
    """An empty steps field is the full chain (N steps), as `uvq sample` without --steps."""
    return None if value in (None, 0) else _count(value, "steps")


def _seed(value: float | None) -> int:
    value = _number(value, "seed")
    if value != int(value) or value < 0:
        raise UserError(f"the seed must be a whole number >= 0 (got {value:g})")
    return int(value)


def parse_boxes(text: str | None) -> list[str]:
    """Box fields as typed on the page: one x0,y0,x1,y1 per line (or separated by ';')."""
    return [b.strip() for b in re.split(r"[;\n]", text or "") if b.strip()]


def editor_image_and_mask(value: dict[str, Any] | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The ImageEditor's value -> (the uploaded image uint8 [H, W, 3], the painted region bool [H, W]).

    The background layer is the image; every stroke of every drawing layer is the region (any
    pixel a layer covers, alpha > 0), whatever the brush colour.
    """
    if not value or value.get("background") is None:
        return None, None
    background = np.asarray(value["background"])
    if background.ndim == 2:
        background = np.stack([background] * 3, -1)
    image = np.ascontiguousarray(background[..., :3]).astype(np.uint8)
    mask = np.zeros(image.shape[:2], dtype=bool)
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[-1] == 4 and layer.shape[:2] == mask.shape:
            mask |= layer[..., 3] > 0
    return image, mask


def gradio_progress(progress: gr.Progress) -> ProgressFn:
    """uvq's progress events (uvq.progress) -> a gradio progress bar: the fraction done where the
    task has a total, a count of its units otherwise."""
    state: dict[str, Any] = {}

    def report(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            state.update(task=event.get("task"), total=event.get("total"), unit=event.get("unit", "steps"),
                         done=int(event.get("completed") or 0))
            progress((state["done"], state["total"]), desc=state["task"], unit=state["unit"])
        elif kind == "advance" and state:
            state["done"] += int(event.get("n", 1))
            progress((state["done"], state["total"]), desc=state["task"], unit=state["unit"])
        elif kind == "log":
            progress(None, desc=str(event.get("message", ""))[:120])

    return report


def _on_page(fn):
    """Run a request and turn a UserError into a message on the page (the server keeps running)."""
    @functools.wraps(fn)  # gradio reads the signature (through __wrapped__) to pass its gr.Progress
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
    return wrapped


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------


def _theme() -> gr.themes.Base:
    """gradio's default look with local font stacks only: no request to a font service."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


def build_blocks(studio: Studio) -> gr.Blocks:
    """The page: Sample, Inpaint and Canvas tabs over `studio`."""
    s = studio.served
    last_samples: dict[str, Any] = {}
    with gr.Blocks(analytics_enabled=False, title="uvq") as blocks:
        gr.Markdown(f"## uvq: {s.prior}\nVQGAN {s.vqgan}; images {s.image_size}x{s.image_size}, "
                    f"latents {s.window[0]}x{s.window[1]} (downsampling {s.downsample}). "
                    f"Each request writes under `{s.out}`.")
        with gr.Tab("Sample", id="sample"):
            with gr.Row():
                steps = gr.Number(s.sample.steps, label="steps (0: N, the full chain)", precision=0, elem_id="sample-steps")
                temp = gr.Number(s.sample.temp, label="temperature", elem_id="sample-temp")
                sampler = gr.Dropdown(list(s.samplers), value=s.sample.sampler, label="sampler", elem_id="sample-sampler")
                seed = gr.Number(0, label="seed", precision=0, elem_id="sample-seed")
                count = gr.Number(min(s.sample.n, 8), label="count", precision=0, elem_id="sample-count")
            go = gr.Button("Sample", variant="primary", elem_id="sample-go")
            gallery = gr.Gallery(label="samples", columns=8, height=240, object_fit="contain", fit_columns=False, format="png",
                                 elem_id="sample-gallery")
            files = gr.File(label="PNGs and samples.json (the settings that made them)", file_count="multiple",
                            elem_id="sample-files")

            def run_sample(steps_v, temp_v, sampler_v, seed_v, count_v, progress=gr.Progress()):
                result = studio.sample(n=count_v, steps=steps_v, temp=temp_v, sampler=sampler_v, seed=seed_v,
                                       progress=gradio_progress(progress))
                last_samples["first"] = result["images"][0]
                return [str(p) for p in result["images"]], [str(p) for p in result["files"]]

            go.click(_on_page(run_sample), [steps, temp, sampler, seed, count], [gallery, files],
                     concurrency_id=CONCURRENCY, concurrency_limit=1)

        with gr.Tab("Inpaint", id="inpaint"):
            with gr.Row():
                editor = gr.ImageEditor(label="image: paint the region to regenerate", type="numpy",
                                        image_mode="RGBA", format="png", sources=["upload", "clipboard"],
                                        brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"), elem_id="inpaint-editor")
                with gr.Column():
                    boxes = gr.Textbox(label="boxes x0,y0,x1,y1 (image pixels, x1/y1 exclusive; one a line)",
                                       lines=2, elem_id="inpaint-boxes")
                    i_temp = gr.Number(s.inpaint.temp, label="temperature", elem_id="inpaint-temp")
                    i_count = gr.Number(min(s.inpaint.n, 4), label="completions", precision=0, elem_id="inpaint-count")
                    i_seed = gr.Number(0, label="seed", precision=0, elem_id="inpaint-seed")
                    i_composite = gr.Checkbox(s.inpaint.composite, label="composite: keep the known pixels",
                                              elem_id="inpaint-composite")
                    use_sample = gr.Button("Edit the first sample", elem_id="inpaint-use-sample")
                    i_go = gr.Button("Inpaint", variant="primary", elem_id="inpaint-go")
            i_grid = gr.Image(label="original, mask and completions", type="filepath", format="png",
                              elem_id="inpaint-grid")
            i_gallery = gr.Gallery(label="completions", columns=8, height=240, object_fit="contain", fit_columns=False, format="png",
                                   elem_id="inpaint-gallery")
            i_files = gr.File(label="completions, grid and inpaint.json", file_count="multiple", elem_id="inpaint-files")

            def take_sample():
                if "first" not in last_samples:
                    raise gr.Error("no sample yet: draw some on the Sample tab first", print_exception=False)
                return str(last_samples["first"])

            def run_inpaint(value, boxes_v, temp_v, count_v, seed_v, composite_v, progress=gr.Progress()):
                image, mask = editor_image_and_mask(value)
                result = studio.inpaint(image=image, mask=mask, boxes=parse_boxes(boxes_v), n=count_v, temp=temp_v,
                                        composite=composite_v, seed=seed_v, progress=gradio_progress(progress))
                return (str(result["grid"]), [str(p) for p in result["images"]], [str(p) for p in result["files"]])

            use_sample.click(_on_page(take_sample), None, editor)
            i_go.click(_on_page(run_inpaint), [editor, boxes, i_temp, i_count, i_seed, i_composite],
                       [i_grid, i_gallery, i_files], concurrency_id=CONCURRENCY, concurrency_limit=1)

        with gr.Tab("Canvas", id="canvas"):
            big = s.image_size * 2
            with gr.Row():
                c_height = gr.Number(big, label="height (pixels)", precision=0, elem_id="canvas-height")
                c_width = gr.Number(big * 2, label="width (pixels)", precision=0, elem_id="canvas-width")
                c_stride = gr.Number(s.canvas.stride, label="stride (latents)", precision=0, elem_id="canvas-stride")
                c_wrap = gr.Checkbox(s.canvas.wrap, label="wrap (a tile)", elem_id="canvas-wrap")
            with gr.Row():
                c_steps = gr.Number(s.canvas.steps, label="steps (0: N, the full chain)", precision=0, elem_id="canvas-steps")
                c_temp = gr.Number(s.canvas.temp, label="temperature", elem_id="canvas-temp")
                c_seed = gr.Number(0, label="seed", precision=0, elem_id="canvas-seed")
                c_count = gr.Number(1, label="count", precision=0, elem_id="canvas-count")
            c_go = gr.Button("Sample a canvas", variant="primary", elem_id="canvas-go")
            c_gallery = gr.Gallery(label="canvases", columns=2, object_fit="contain", fit_columns=False, format="png",
                                   elem_id="canvas-gallery")
            c_windows = gr.Gallery(label=f"the first canvas's windows (at most {MAX_WINDOWS_SHOWN})", columns=8,
                                   height=160, object_fit="contain", fit_columns=False, format="png",
                                   elem_id="canvas-windows")
            c_files = gr.File(label="canvases and samples.json", file_count="multiple", elem_id="canvas-files")

            def run_canvas(h, w, stride_v, wrap_v, steps_v, temp_v, seed_v, count_v, progress=gr.Progress()):
                result = studio.canvas(height=h, width=w, stride=stride_v, wrap=wrap_v, n=count_v, steps=steps_v,
                                       temp=temp_v, seed=seed_v, progress=gradio_progress(progress))
                return ([str(p) for p in result["images"]], result["windows"], [str(p) for p in result["files"]])

            c_go.click(_on_page(run_canvas), [c_height, c_width, c_stride, c_wrap, c_steps, c_temp, c_seed, c_count],
                       [c_gallery, c_windows, c_files], concurrency_id=CONCURRENCY, concurrency_limit=1)
    return blocks


def serve(served: Served, *, host: str = "127.0.0.1", port: int = 7860, progress: ProgressFn = null_progress,
          ready: threading.Event | None = None) -> None:
    """Serve the app on host:port until interrupted (Ctrl-C, SIGTERM: the KeyboardInterrupt leaves
    through the caller, so the command exits 130/143 as any interrupted command).

    gradio's own blocking loop would swallow the interrupt and print; the server runs in gradio's
    thread and this loop waits, quietly (library code prints nothing: the URL leaves as a log event).
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # gradio reads it at each report: none is sent
    blocks = build_blocks(Studio(served))
    blocks.queue(default_concurrency_limit=1)
    try:
        blocks.launch(server_name=host, server_port=port, share=False, inbrowser=False, quiet=True,
                      prevent_thread_lock=True, show_error=True, ssr_mode=False, pwa=False, mcp_server=False,
                      enable_monitoring=False, allowed_paths=[str(served.out)], theme=_theme())
    except OSError as exc:
        raise UserError(f"cannot serve on {host}:{port}: {exc}; choose another --port") from exc
    try:
        progress({"event": "log", "message": f"serving on {blocks.local_url} (Ctrl-C stops it)"})
        if ready is not None:
            ready.set()
        while True:
            time.sleep(0.5)
    finally:
        blocks.close(verbose=False)
