"""`uvq eval bpd`: full-model bits per dimension of an image split. A thin wrapper over uvq.evaluation.bpd."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import typer

from uvq.cli.common import (
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    VqganOpt,
    apply_local,
    emit,
    eval_app,
    reporter,
)

ENTRIES = ("likelihood_head.safetensors", "bpd.csv", "bpd.json")


def bpd_section(meta: dict, overrides: list[str], bits: int | None):
    """The `bpd` section: the prior's recipe's, then --bits, then `bpd.key=value` overrides; validated."""
    from uvq.config import BPDConfig, ConfigError, apply_overrides, section_from_dict

    data = {"bpd": dict((meta.get("config") or {}).get("bpd") or {})}
    if bits is not None:
        data["bpd"]["bits"] = bits
    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith("bpd."):
            raise ConfigError(f"override {item!r}: this command takes bpd.KEY=VALUE overrides, e.g. bpd.bits=5")
    cfg = section_from_dict(BPDConfig, apply_overrides(data, overrides)["bpd"], "bpd")
    cfg.validate("bpd")
    return cfg


def register(app: typer.Typer) -> None:
    @eval_app.command("bpd")
    def eval_bpd_cmd(
        overrides: list[str] = typer.Argument(None, help="bpd.KEY=VALUE overrides (bits, finetune_steps, ...)."),
        prior: Path = typer.Option(..., "--prior", help="Prior checkpoint or run directory (best, then last)."),
        data: str = typer.Option(..., "--data", help="Images: demo, a folder or webdataset shards (the VQGAN's data)."),
        out: Path = typer.Option(..., "--out", "-o", help="Writes likelihood_head.safetensors, bpd.csv and bpd.json."),
        vqgan: Path = VqganOpt,
        split: str = typer.Option("val", "--split", help="train or val: the split whose bits per dimension are reported."),
        bits: int = typer.Option(None, "--bits", help="Pixel bit depth (shortcut for bpd.bits; 8 by default, 5 in the paper)."),
        max_images: int = typer.Option(None, "--max-images", help="Only the first N images of each split."),
        weights: str = typer.Option("default", "--weights", help="Prior weights: default, ema or model."),
        seed: int = typer.Option(0, "--seed", help="Seed of the head's initialisation and the masking draws."),
        device: str = DeviceOpt,
        overwrite: bool = OverwriteOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Bits per dimension (prior ELBO of the codes + the decoder's discretised Gaussian NLL), per image (CSV).

        The decoder's likelihood head is fitted first (everything else frozen) and saved in --out;
        a rerun into the same directory reuses it when its inputs match.
        """
        from uvq.checkpoint import read_prior_meta, resolve_pair
        from uvq.evaluation.bpd import bpd_csv_rows, evaluate_bpd
        from uvq.files import atomic_write_json, atomic_write_text, check_out_dir, claim_out_dir
        from uvq.runtime import UserError

        apply_local(json_flag, debug)
        # Everything is checked before the first write: arguments, recipe section, the pair, the data.
        if split not in ("train", "val"):
            raise UserError(f"--split must be train or val, not {split!r}")
        if max_images is not None and max_images < 1:
            raise UserError(f"--max-images must be >= 1 (got {max_images})")
        meta = read_prior_meta(prior)
        cfg = bpd_section(meta, overrides or [], bits)
        resolve_pair(meta, vqgan)
        if data != "demo" and "://" not in data and not data.startswith("pipe:") and not Path(data).exists():
            raise UserError(f"--data {data} does not exist; pass demo, an image folder or webdataset shards")
        inputs = (prior, vqgan, None if data == "demo" else data)
        check_out_dir(out, command="eval bpd", overwrite=overwrite, resume=not overwrite, inputs=inputs)
        claim_out_dir(out, command="eval bpd", overwrite=overwrite, resume=not overwrite, inputs=inputs,
                      entries=ENTRIES, lock=False)
        rep = reporter()
        try:
            result = evaluate_bpd(prior, data, out, cfg=cfg, split=split, vqgan=vqgan, weights=weights, seed=seed,
                                  max_images=max_images, device=device, progress=rep)
        finally:
            rep.close()
        buf = io.StringIO()
        csv.writer(buf).writerows(bpd_csv_rows(result))
        atomic_write_text(Path(out) / "bpd.csv", buf.getvalue())
        report = {"metric": "bits per dimension", "unit": "bits per dimension",
                  **{k: v for k, v in result.items() if k not in ("keys", "bpd", "prior_bits_per_token",
                                                                  "pixel_bits_per_dim")}}
        atomic_write_json(Path(out) / "bpd.json", report)
        report["csv"] = str(Path(out) / "bpd.csv")
        head = "reused" if result["head"]["reused"] else "fitted"
        emit(report, human=f"{result['mean']:.4f} ± {result['mean_stderr']:.4f} bits per dimension over "
                           f"{result['num_images']} {split} images at {result['bits']} bits ({result['num_groups']} "
                           f"image groups; prior {result['mean_prior_bits_per_token']:.4f} bits/token, pixels "
                           f"{result['mean_pixel_bits_per_dim']:.4f} bits/dim; head {head})\n"
                           f"per-image values: {report['csv']}")
