"""Foreign checkpoints: the paper's released models and taming-transformers' VQGANs (docs/method.md section 8).

The layouts that come in, and how they are loaded, recognised, read and mapped onto uvq's
modules, are `uvq.interop.layouts`. This module runs the import: what is written is an ordinary uvq
checkpoint directory, with the provenance of its source files, which is then reloaded and checked
against a forward pass computed straight from the original tensors by the functional references
in `uvq.interop.reference`, written from the original codes' forward passes and independent of uvq's
modules.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from uvq import __version__
from uvq.checkpoint import mark_verified
from uvq.files import check_out_dir, claim_out_dir, record_written_dir, sha256_file
from uvq.interop.layouts import (
    _LAYOUT_NAMES,
    KeyMap,
    Tensors,
    _expect_layout,
    _finish,
    _map_discriminator,
    _split_levels,
    _tensors_only,
    check_against_preset,
    detect_layout,
    infer_official_prior,
    infer_official_vqgan,
    infer_taming_vqgan,
    load_tensor_file,
    map_official_prior,
    map_official_vqgan,
    map_taming_vqgan,
    preset_configs,
)
from uvq.interop.reference import (
    lookup_codes,
    nearest_codes,
    official_blocks,
    official_decode,
    official_encode,
    official_logsigma,
    official_transformer,
    taming_decode,
    taming_encode,
)
from uvq.progress import ProgressFn, null_progress
from uvq.runtime import UserError

IMPORTER_VERSION = 1
TOLERANCE = 1e-4  # largest relative difference accepted by the verification (fp32)


# ---------------------------------------------------------------------------------------------
# Verification: the written checkpoint against the original forward pass
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _exact_matmul() -> Iterator[None]:
    """fp32 without TF32 on CUDA, so that the comparison measures the import, not the arithmetic."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def difference(a: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference and that divided by the reference's largest magnitude."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    abs_diff = float((a - ref).abs().max()) if a.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return {"max_abs": abs_diff, "max_rel": abs_diff / max(scale, 1e-12)}


def _probe_images(n: int, size: int, channels: int, seed: int = 0) -> torch.Tensor:
    """Deterministic smooth test images in [0,1]: random low-resolution colours, upsampled."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, max(size // 8, 1), max(size // 8, 1), generator=g)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.05 * torch.rand(n, channels, size, size, generator=g)).clamp(0, 1)


def verify_vqgan(ckpt: Path, original: Tensors, layout: str, *, device: torch.device, size: int,
                 tolerance: float = TOLERANCE, images: int = 2) -> dict[str, Any]:
    """Reload `ckpt` with uvq.checkpoint.load_model and compare with the original layout's forward.

    Codes must agree except at near ties of the distance; the decoder is compared on the
    reference codes (what the sampler decodes), so a tie cannot spread into the images.
    """
    from uvq.checkpoint import load_model

    model, meta = load_model(ckpt, "vqgan", device=device, allow_unverified=True)
    p = {k: v.to(device).float() for k, v in original.items()}
    x = _probe_images(images, size, int(meta["model_config"]["in_channels"])).to(device)
    codebook = p["ae.quantize.embedding.weight" if layout == "official" else "quantize.embedding.weight"]
    ref_logsigma = logsigma = None
    with torch.no_grad(), _exact_matmul():
        if layout == "official":
            z = official_encode(p, x)
            ref_codes = nearest_codes(z, codebook)
            ref_img = official_decode(p, lookup_codes(ref_codes, codebook))
            if "ae.generator.logsigma.0.weight" in p:
                ref_logsigma = official_logsigma(p, lookup_codes(ref_codes, codebook))
                logsigma = model.decoder.probabilistic(model.quantize.lookup(ref_codes))[1]
        else:
            z = taming_encode(p, x * 2 - 1)
            ref_codes = nearest_codes(z, codebook)
            ref_img = (taming_decode(p, lookup_codes(ref_codes, codebook)) + 1) / 2  # uvq returns [0,1]
        codes = model.encode_codes(x)
        img = model.decode_codes(ref_codes)
        # a code that differs is acceptable only where two entries are (nearly) equally close
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        gap = dist.gather(1, codes.reshape(-1, 1)) - dist.gather(1, ref_codes.reshape(-1, 1))
        ties = float(tolerance * dist.abs().max())
        mismatched = int((codes != ref_codes).sum())
        real_mismatch = int((gap.abs() > ties).sum())
    diff = difference(img, ref_img)
    result = {"kind": "vqgan", "images": images, "size": size, "codes_mismatch": mismatched,
              "codes_total": int(codes.numel()), **diff, "tolerance": tolerance}
    if ref_logsigma is not None:  # the likelihood head, when the file has one
        result["logsigma"] = difference(logsigma, ref_logsigma)
        diff["max_rel"] = max(diff["max_rel"], result["logsigma"]["max_rel"])
    result["ok"] = real_mismatch == 0 and diff["max_rel"] <= tolerance
    return result


def verify_prior(ckpt: Path, original: Tensors, n_head: int, *, device: torch.device,
                 tolerance: float = TOLERANCE, seed: int = 0) -> dict[str, Any]:
    """Reload the prior and compare its logits with the authors' transformer on masked token grids."""
    from uvq.checkpoint import load_model

    model, meta = load_model(ckpt, "prior", device=device, allow_unverified=True)
    cfg = meta["model_config"]
    k = int(cfg["codebook_size"])
    n = int(cfg["latent_shape"][0]) * int(cfg["latent_shape"][1])
    g = torch.Generator().manual_seed(seed)
    rates = torch.tensor([0.5, 1.0]).unsqueeze(1)  # one half-masked grid, one fully masked (sampling's start)
    x0 = torch.randint(0, k, (len(rates), n), generator=g)
    x_t = torch.where(torch.rand(x0.shape, generator=g) < rates, torch.full_like(x0, k), x0).to(device)
    p = {key: v.to(device).float() for key, v in original.items() if key.startswith("_denoise_fn.")}
    with torch.no_grad(), _exact_matmul():
        ref = official_transformer(p, x_t, n_head)
        out = model(x_t)
    result = {"kind": "prior", "rows": len(rates), **difference(out, ref), "tolerance": tolerance}
    result["ok"] = result["max_rel"] <= tolerance
    return result


# ---------------------------------------------------------------------------------------------
# Importers
# ---------------------------------------------------------------------------------------------


def _source_record(path: Path, role: str, sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values() if v.is_floating_point()})
    return {"role": role, "name": path.name, "path": str(path.resolve()), "sha256": sha256_file(path),
            "bytes": path.stat().st_size, "dtypes": dtypes}


def _provenance(fmt: str, sources: list[dict[str, Any]], inferred: dict[str, Any], mapping: KeyMap,
                conventions: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "source": "import",
        "importer": {"name": f"uvq.convert.{fmt}", "version": IMPORTER_VERSION, "uvq_version": __version__},
        "files": sources,
        "inferred_architecture": inferred,
        "keys": mapping.summary(),
        "conventions": conventions,
        **extra,
    }


def _build(kind: str, cfg: dict[str, Any]) -> torch.nn.Module:
    """uvq's module for `cfg` on the meta device: names, shapes and dtypes without memory or init cost."""
    from uvq.checkpoint import build_model

    with torch.device("meta"):
        return build_model(kind, cfg)


def _write(path: Path, kind: str, cfg: dict[str, Any], weights: Tensors, provenance: dict[str, Any]) -> Path:
    from uvq.checkpoint import write_checkpoint_dir

    # marked unverified until the verification passes: a killed import is never taken for a finished one
    return write_checkpoint_dir(path, kind=kind, model_config=cfg, weights={"model": weights},
                                provenance=provenance, default_weights="model", unverified=True)


def _verify_size(cfg: dict[str, Any], verify_size: int | None) -> int:
    """The verification's image size: `verify_size`, else the training size capped at 128.

    The networks are convolutional and their attention sits at fixed levels, so a smaller image
    passes through every weight; the cap keeps a CPU import quick.
    """
    down = 2 ** (len(cfg["ch_mult"]) - 1)
    size = verify_size or min(int(cfg["img_size"]), max(128, down))
    if size % down:
        raise UserError(f"--verify-size {size} must be a multiple of the downsampling factor {down}")
    return size


def _report(progress: ProgressFn, name: str, result: dict[str, Any]) -> None:
    extra = f", codes differing {result['codes_mismatch']}/{result['codes_total']}" if "codes_total" in result else ""
    progress({"event": "log", "message": f"verified {name}: max abs diff {result['max_abs']:.3g}, max rel diff "
                                         f"{result['max_rel']:.3g} (tolerance {result['tolerance']:g}){extra}"})


def _check_out(out: Path, overwrite: bool, inputs: tuple[Path | None, ...], whole: bool = False) -> None:
    """uvq.files.check_out_dir for an import (nothing to resume), before any work. A `whole`
    import replaces `out` by one rename (the taming checkpoint is `out` itself), so `out` may not
    hold anything uvq did not write."""
    plan = check_out_dir(out, command="import", overwrite=overwrite, inputs=inputs)
    if whole and plan.foreign:
        raise UserError(f"{out} holds {plan.foreign[0]!r}, which uvq did not write, and an import replaces the whole "
                        "directory; move it away or choose another --out")


def _claim_out(out: Path, overwrite: bool, inputs: tuple[Path | None, ...]) -> None:
    claim_out_dir(out, command="import", overwrite=overwrite, inputs=inputs, entries=("vqgan", "prior"), lock=False)


def _fail_verification(written: list[Path], name: str, result: dict[str, Any]) -> UserError:
    for path in written:
        shutil.rmtree(path, ignore_errors=True)
    return UserError(f"verification failed for the imported {name}: max rel diff {result['max_rel']:.3g} > "
                     f"{result['tolerance']:g}, {result.get('codes_mismatch', 0)} codes differ; nothing was kept "
                     "(please report this with the file's sha256)")


def _load_official_vqgan(path: Path) -> Tensors:
    sd = load_tensor_file(path, "--vqgan")
    _expect_layout(sd, "official-vqgan", path, "--vqgan")
    return _tensors_only(sd, path, "--vqgan")


def _load_official_prior(path: Path) -> Tensors:
    sd = load_tensor_file(path, "--prior")
    _expect_layout(sd, "official-prior", path, "--prior")
    return _tensors_only(sd, path, "--prior")


def import_official(out: str | Path, *, vqgan: str | Path, prior: str | Path | None = None,
                    heads: int | None = None, preset: str | None = None, img_size: int | None = None,
                    with_disc: bool = False, overwrite: bool = False, device: str | torch.device = "cpu",
                    verify_size: int | None = None, tolerance: float = TOLERANCE,
                    progress: ProgressFn | None = None) -> dict[str, Any]:
    """Import the authors' VQGAN (and prior) state dicts into `out/vqgan` (and `out/prior`).

    Args:
        vqgan: `vqgan_ema_<step>.th` (or `vqgan_<step>.th`), a state dict with `ae.*` keys.
        prior: `absorbing_ema_<step>.th`, a state dict with `_denoise_fn.*` keys; it must have been
            trained on `vqgan`'s codes (its `embedding_weight` must equal the VQGAN's codebook).
        heads: attention heads of the prior (shapes cannot tell); from `preset` when not given.
        preset: ffhq | churches | bedroom: check that the weights are the paper's model and take
            its settings (8 heads, 256x256).
        img_size: the VQGAN's image size; read from the prior's positions when a prior is given,
            else from the preset, else 256.
        with_disc: also keep the discriminator (`disc.*`) as `discriminator.safetensors`.
        verify_size: image size of the verification pass (default: img_size, at most 128).

    Returns the summary: paths, inferred configs, key accounting, verification figures.
    """
    progress = progress or null_progress
    device = torch.device(device)
    out = Path(out)
    _check_out(out, overwrite, (Path(vqgan), prior and Path(prior)))
    vq_path = Path(vqgan)
    vq_sd = _load_official_vqgan(vq_path)
    pr_path = Path(prior) if prior is not None else None
    pr_sd = _load_official_prior(pr_path) if pr_path is not None else None

    # Image size: the prior's N fixes the latent grid, hence the image size.
    want_vq = want_prior = None
    if preset is not None:
        want_vq, want_prior = preset_configs(preset)
    if pr_sd is not None and "_denoise_fn.pos_emb" in pr_sd:
        n_tokens = int(pr_sd["_denoise_fn.pos_emb"].shape[1])
        side = math.isqrt(n_tokens)
        levels = len(_split_levels(official_blocks(vq_sd, "ae.encoder.blocks")[1:-5]))
        from_prior = side * 2 ** (levels - 1) if side * side == n_tokens else None
        if img_size is not None and from_prior is not None and img_size != from_prior:
            raise UserError(f"--img-size {img_size} disagrees with the prior, whose {n_tokens} positions make "
                            f"{side}x{side} codes, i.e. {from_prior}x{from_prior} images")
        img_size = img_size or from_prior
    if img_size is None and want_vq is not None:
        img_size = want_vq["img_size"]
    vq_cfg = infer_official_vqgan(vq_sd, img_size, progress)
    if heads is None and pr_sd is not None:
        if want_prior is None:
            raise UserError("the number of attention heads cannot be read from the weights; pass --heads N "
                            "or --preset ffhq|churches|bedroom (the paper's models have 8)")
        heads = int(want_prior["n_head"])
    latent = tuple(vq_cfg["img_size"] // 2 ** (len(vq_cfg["ch_mult"]) - 1) for _ in range(2))
    pr_cfg = infer_official_prior(pr_sd, heads, latent) if pr_sd is not None else None
    if preset is not None:
        check_against_preset(preset, vq_cfg, pr_cfg)
        if heads is not None and pr_cfg is not None and heads != want_prior["n_head"]:
            raise UserError(f"--heads {heads} differs from the paper's {preset} model ({want_prior['n_head']} heads)")
    if pr_sd is not None:
        copy = pr_sd.get("embedding_weight")
        book = vq_sd["ae.quantize.embedding.weight"]
        if copy is not None and (copy.shape != book.shape or not torch.allclose(copy.float(), book.float(), atol=1e-6)):
            raise UserError(f"the prior {pr_path.name} was trained on another VQGAN's codes: its embedding_weight "
                            f"differs from the codebook of {vq_path.name}; give the VQGAN it was trained with "
                            "(the same run's vqgan_ema_<step>.th)")

    # Map every key, then build uvq's modules and check names and shapes.
    vq_map = map_official_vqgan(vq_sd, with_disc)
    vq_weights = _finish(vq_map, _build("vqgan", vq_cfg), "VQGAN", vq_path)
    disc = _map_discriminator(vq_sd, "disc.", vq_path) if with_disc else None
    pr_map = pr_weights = None
    if pr_sd is not None:
        target = _build("prior", _prior_section(pr_cfg))
        pr_map = map_official_prior(pr_sd, fused_qkv=any(k.endswith("attn.qkv.weight") for k in target.state_dict()))
        pr_weights = _finish(pr_map, target, "prior", pr_path)

    # Write.
    _claim_out(out, overwrite, (vq_path, pr_path))
    vq_src = _source_record(vq_path, "vqgan", vq_sd)
    conventions = {"image_range": "[0, 1] (the authors' convention, as uvq's)", "mask_id": vq_cfg["codebook_size"]}
    vq_dir = _write(out / "vqgan", "vqgan", vq_cfg, vq_weights,
                    _provenance("official", [vq_src], vq_cfg, vq_map, conventions))
    written = [vq_dir]
    if disc is not None:
        _write_discriminator(vq_dir, *disc)
    summary: dict[str, Any] = {"format": "official", "out": str(out), "vqgan": _ckpt_summary(vq_dir, vq_cfg, vq_map)}
    if pr_sd is not None:
        from uvq.checkpoint import read_meta
        from uvq.prior.latents import tokenizer_record

        vq_meta = read_meta(vq_dir, allow_unverified=True)
        vq_meta["weights_sha256"] = vq_meta["weights_sha256"]["model"]
        tokenizer = tokenizer_record(vq_meta, "model")
        pr_section = _prior_section(pr_cfg)
        prov = _provenance("official", [_source_record(pr_path, "prior", pr_sd)], pr_section, pr_map,
                           {**conventions, "heads": f"{heads} (given, not in the weights)"},
                           tokenizer=tokenizer, vqgan=str(vq_dir),
                           # what `fit-prior` records of its latents' manifest; the authors' cache is not shipped
                           latents={"codebook_size": pr_cfg["codebook_size"], "latent_shape": pr_cfg["latent_shape"],
                                    "tokenizer": tokenizer, "source": "the authors' training latents (not shipped)"})
        pr_dir = _write(out / "prior", "prior", pr_section, pr_weights, prov)
        written.append(pr_dir)
        summary["prior"] = _ckpt_summary(pr_dir, pr_section, pr_map)

    # Verify what was written against the original layout.
    size = _verify_size(vq_cfg, verify_size)
    progress({"event": "log", "message": f"verifying the imported VQGAN at {size}x{size} on {device}"})
    res = verify_vqgan(vq_dir, vq_sd, "official", device=device, size=size, tolerance=tolerance)
    _report(progress, "vqgan", res)
    summary["vqgan"]["verification"] = res
    if not res["ok"]:
        raise _fail_verification(written, "VQGAN", res)
    if pr_sd is not None:
        res = verify_prior(out / "prior", pr_sd, heads, device=device, tolerance=tolerance)
        _report(progress, "prior", res)
        summary["prior"]["verification"] = res
        if not res["ok"]:
            raise _fail_verification(written, "prior", res)
    for path in written:
        mark_verified(path)
    return summary


def import_taming(out: str | Path, *, vqgan: str | Path, img_size: int | None = None, with_disc: bool = False,
                  overwrite: bool = False, device: str | torch.device = "cpu", verify_size: int | None = None,
                  tolerance: float = TOLERANCE, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Import a taming-transformers VQModel (Lightning `.ckpt`) as the uvq checkpoint directory `out`.

    The result is a VQGAN of variant "taming": quant_conv / post_quant_conv, swish before the final
    convs, `res_blocks + 1` decoder blocks per level, and [0,1] <-> [-1,1] inside, so that uvq's
    API keeps taking [0,1] images. `img_size` (default 256, taming's) names the attention levels.
    """
    progress = progress or null_progress
    device = torch.device(device)
    out = Path(out)
    _check_out(out, overwrite, (Path(vqgan),), whole=True)
    path = Path(vqgan)
    raw = load_tensor_file(path, "--vqgan")
    found = detect_layout(raw)
    if found == "lightning":
        raw = dict(raw["state_dict"])
    elif found != "taming-vqgan":
        raise UserError(f"--vqgan {path} is the wrong kind of file: it is {_LAYOUT_NAMES[found]}")
    sd = _tensors_only(raw, path, "--vqgan")
    if detect_layout(sd) != "taming-vqgan":
        raise UserError(f"--vqgan {path} holds a Lightning state_dict that is not a taming VQModel "
                        f"(no encoder.down.* / decoder.up.* keys): it is {_LAYOUT_NAMES[detect_layout(sd)]}")
    cfg = infer_taming_vqgan(sd, img_size, progress)
    mapping = map_taming_vqgan(sd, with_disc)
    weights = _finish(mapping, _build("vqgan", cfg), "VQGAN (taming variant)", path)
    disc = _map_discriminator(sd, "loss.discriminator.", path) if with_disc else None

    _check_out(out, overwrite, (path,), whole=True)
    _claim_out(out, overwrite, (path,))
    conventions = {"image_range": "[-1, 1] inside the networks; uvq's API converts from and to [0, 1]",
                   "quant_conv": True, "swish_before_final_convs": True,
                   "decoder_res_blocks": cfg["dec_res_blocks"], "mask_id": cfg["codebook_size"]}
    ckpt = _write(out, "vqgan", cfg, weights,
                  _provenance("taming", [_source_record(path, "vqgan", sd)], cfg, mapping, conventions))
    if disc is not None:
        _write_discriminator(ckpt, *disc)
    record_written_dir(ckpt, command="import")  # the directory stays ours for a later --overwrite
    summary: dict[str, Any] = {"format": "taming", "out": str(out), "vqgan": _ckpt_summary(ckpt, cfg, mapping)}
    size = _verify_size(cfg, verify_size)
    progress({"event": "log", "message": f"verifying the imported VQGAN at {size}x{size} on {device}"})
    res = verify_vqgan(ckpt, sd, "taming", device=device, size=size, tolerance=tolerance)
    _report(progress, "vqgan", res)
    summary["vqgan"]["verification"] = res
    if not res["ok"]:
        raise _fail_verification([ckpt], "VQGAN", res)
    mark_verified(ckpt)
    return summary


def _prior_section(cfg: dict[str, Any]) -> dict[str, Any]:
    """The PriorConfig dict of an imported prior."""
    return {"name": "absorbing_transformer.v1", **cfg, "dropout": 0.0}


def _ckpt_summary(path: Path, cfg: dict[str, Any], mapping: KeyMap) -> dict[str, Any]:
    return {"path": str(path), "model_config": cfg, "keys": mapping.summary()}


def _write_discriminator(ckpt: Path, model: torch.nn.Module, weights: Tensors, cfg: dict[str, Any]) -> None:
    """`discriminator.safetensors` beside the VQGAN's weights (its config in the file's metadata)."""
    import json

    from safetensors.torch import save_file

    from uvq.files import atomic_path

    with atomic_path(ckpt / "discriminator.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"uvq": json.dumps({"kind": "discriminator", "model_config": cfg})})


__all__ = ["import_official", "import_taming", "verify_vqgan", "verify_prior", "difference", "TOLERANCE",
           "IMPORTER_VERSION"]
