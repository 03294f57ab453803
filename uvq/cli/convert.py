"""`uvq import official` and `uvq import taming`: foreign checkpoints into uvq checkpoint directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from uvq.cli.common import (
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    OutOpt,
    OverwriteOpt,
    apply_local,
    emit,
    reporter,
)

ImgSizeOpt = typer.Option(None, "--img-size", help="Image size the VQGAN was trained at (names its attention "
                                                   "levels; default: from the prior or preset, else 256).")
WithDiscOpt = typer.Option(False, "--with-disc", help="Also keep the discriminator (discriminator.safetensors).")
VerifySizeOpt = typer.Option(None, "--verify-size", help="Image size of the verification pass (default: the image size, at most 128).")


def _human(summary: dict[str, Any]) -> str:
    lines = []
    for part in ("vqgan", "prior"):
        if part not in summary:
            continue
        s = summary[part]
        v = s["verification"]
        ignored = sum(s["keys"]["ignored"].values())
        lines.append(f"{part}: {s['path']} ({s['keys']['mapped']} tensors mapped, {ignored} ignored; "
                     f"verified: max abs diff {v['max_abs']:.3g}, max rel diff {v['max_rel']:.3g})")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    import_app = typer.Typer(help="Import released checkpoints: the paper's (official) and taming-transformers' VQGANs.",
                             no_args_is_help=True)
    app.add_typer(import_app, name="import")

    @import_app.command("official")
    def official(
        vqgan: Path = typer.Option(..., "--vqgan", help="The authors' VQGAN state dict (vqgan_ema_<step>.th)."),
        prior: Path = typer.Option(None, "--prior", help="The authors' prior state dict (absorbing_ema_<step>.th)."),
        out: Path = OutOpt,
        preset: str = typer.Option(None, "--preset", help="ffhq, churches or bedroom: check the weights against "
                                                          "the paper's model and take its settings (8 heads)."),
        heads: int = typer.Option(None, "--heads", help="Attention heads of the prior (not in the weights)."),
        img_size: int = ImgSizeOpt,
        with_disc: bool = WithDiscOpt,
        device: str = DeviceOpt,
        verify_size: int = VerifySizeOpt,
        overwrite: bool = OverwriteOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Import the paper's released VQGAN (and prior) into OUT/vqgan (and OUT/prior)."""
        from uvq.interop.convert import import_official
        from uvq.runtime import resolve_device

        apply_local(json_flag, debug)
        summary = import_official(out, vqgan=vqgan, prior=prior, heads=heads, preset=preset, img_size=img_size,
                                  with_disc=with_disc, overwrite=overwrite, device=resolve_device(device),
                                  verify_size=verify_size, progress=reporter())
        emit(summary, human=_human(summary))

    @import_app.command("taming")
    def taming(
        vqgan: Path = typer.Option(..., "--vqgan", help="A taming-transformers VQModel checkpoint (.ckpt)."),
        out: Path = OutOpt,
        img_size: int = ImgSizeOpt,
        with_disc: bool = WithDiscOpt,
        device: str = DeviceOpt,
        verify_size: int = VerifySizeOpt,
        overwrite: bool = OverwriteOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Import a taming-transformers VQGAN as the uvq checkpoint directory OUT."""
        from uvq.interop.convert import import_taming
        from uvq.runtime import resolve_device

        apply_local(json_flag, debug)
        summary = import_taming(out, vqgan=vqgan, img_size=img_size, with_disc=with_disc, overwrite=overwrite,
                                device=resolve_device(device), verify_size=verify_size, progress=reporter())
        emit(summary, human=_human(summary))
