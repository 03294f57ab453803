"""`uvq app`: the local web app (docs/app.md). A thin wrapper over uvq.webapp.serve.

The prior, its VQGAN and the page's defaults are found as `uvq sample` finds them (the prior's
recipe sections, `sample.`/`inpaint.`/`canvas.KEY=VALUE` overrides); everything is checked
before the output directory is claimed or a model is loaded. gradio is imported only here, and
only when the command runs, so `uvq --help` stays free of it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import tempfile
from pathlib import Path

import typer

from uvq.cli.common import (
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    PriorOpt,
    PriorRecipeOpt,
    PriorRunOpt,
    VqganOpt,
    apply_local,
    reporter,
)

SECTIONS = ("sample", "inpaint", "canvas")


def split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """`section.key=value` overrides by section (sample, inpaint or canvas)."""
    from uvq.errors import UserError

    by_section: dict[str, list[str]] = {s: [] for s in SECTIONS}
    for item in overrides:
        section = item.split("=", 1)[0].strip().split(".", 1)[0]
        if section not in by_section:
            raise UserError(f"override {item!r}: `uvq app` takes sample., inpaint. or canvas.KEY=VALUE overrides "
                            "(the model comes from the checkpoint); for example inpaint.n=4")
        by_section[section].append(item)
    return by_section


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    @app.command("app")
    def app_cmd(
        overrides: list[str] = typer.Argument(None, help="sample./inpaint./canvas.KEY=VALUE: the page's defaults."),
        prior: str = PriorOpt,
        run: Path = PriorRunOpt,
        recipe: str = PriorRecipeOpt,
        vqgan: str = VqganOpt,
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but localhost lets "
                                 "others on the network use the app and its files (docs/app.md)."),
        port: int = typer.Option(7860, "--port", help="Port to listen on."),
        out: Path = typer.Option(None, "--out", "-o", help="Keep every request's files here (default: a temporary "
                                 "directory, removed when the app stops)."),
        weights: str = typer.Option("default", "--weights", help="Prior weights: default, ema or model."),
        device: str = DeviceOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Serve a local web app to sample, inpaint (brush or boxes) and draw big canvases."""
        from uvq.errors import UserError

        apply_local(json_flag, debug)
        try:
            import gradio  # noqa: F401  (the optional extra: checked before anything else)
        except ImportError as exc:
            raise UserError(f"`uvq app` needs gradio ({exc}): pip install 'uvq[app]'") from None
        from uvq.checkpoint import find_vqgan, read_meta, verify_checkpoint
        from uvq.cli.sample import generation_section, generation_setup
        from uvq.config import VQGANConfig, section_from_dict
        from uvq.files import check_out_dir, claim_out_dir
        from uvq.registry import registry
        from uvq.runtime import resolve_device
        from uvq.webapp import REQUEST_PATTERNS, Served, serve

        # Arguments, models and the output directory, all checked before anything is written.
        if not 1 <= port <= 65535:
            raise UserError(f"--port must be between 1 and 65535 (got {port})")
        resolve_device(device)
        rep = reporter()
        parts = split_overrides(list(overrides or []))
        ckpt, meta, sample_cfg = generation_setup("sample", prior=prior, run=run, recipe=recipe,
                                                  overrides=parts["sample"], shortcuts={}, weights=weights, rep=rep)
        inpaint_cfg = generation_section("inpaint", meta, parts["inpaint"], {})
        canvas_cfg = generation_section("canvas", meta, parts["canvas"], {})
        allow_other = sample_cfg.allow_other_vqgan or inpaint_cfg.allow_other_vqgan or canvas_cfg.allow_other_vqgan
        vq_path, _, vq_where = find_vqgan(meta, vqgan, allow_other_vqgan=allow_other, progress=rep)
        vq_meta = read_meta(vq_path)
        rep({"event": "log", "message": f"vqgan: {vq_path} (from {vq_where})"})
        verify_checkpoint(ckpt, "prior")
        verify_checkpoint(vq_path, "vqgan")
        if out is not None:
            check_out_dir(out, command="app", resume=True, inputs=(ckpt, vq_path))
        if not is_loopback(host):
            rep({"event": "warn", "message": f"listening on {host}: anyone who can reach this address can sample "
                 "from the model and read the files it wrote, without a password (docs/app.md)"})
        vq_cfg = section_from_dict(VQGANConfig, vq_meta["model_config"], "model.vqgan")
        latent = meta["model_config"]["latent_shape"]

        with tempfile.TemporaryDirectory(prefix="uvq-app-") if out is None else contextlib.nullcontext(str(out)) as root:
            claim = claim_out_dir(root, command="app", resume=True, inputs=(ckpt, vq_path), patterns=REQUEST_PATTERNS)
            try:
                served = Served(prior=ckpt, vqgan=Path(vq_path), sample=sample_cfg, inpaint=inpaint_cfg,
                                canvas=canvas_cfg, out=Path(root), weights=weights, device=device,
                                image_size=vq_cfg.img_size, downsample=vq_cfg.downsample,
                                window=(int(latent[0]), int(latent[1])), samplers=tuple(registry.names("samplers")))
                serve(served, host=host, port=port, progress=rep)
            finally:
                claim.release()
                rep.close()

