"""Benchmarks of the sampler: uvq's chain against the authors' network and loop (uvq.interop.reference),
with figures and ratios (never pass/fail).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uvq.config import VQGANConfig, load_config
from uvq.interop.reference import authors_loop, reference_from
from uvq.prior.model import preset
from uvq.registry import registry
from uvq.runtime import UserError, amp_context, resolve_device
from uvq.sampling.chain import iter_samples, make_predict
from uvq.vqgan.model import build_vqgan

# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (Linux: KiB)


def _time_reference(ref: nn.Module, b: int, args: dict[str, Any], variants, steps_now: int,
                    spent: dict[str, float], ran: dict[str, int]) -> None:
    """Run `steps_now` steps of the reference loop per variant, adding to the time and step counts."""
    dev, shape = args["device"], (b, args["n_tokens"])
    x = torch.full(shape, args["mask_id"], dtype=torch.long, device=dev)

    def uniform() -> torch.Tensor:
        return torch.rand(shape, device=dev)

    for name, amp in variants:
        _sync(args["device"])
        t0 = time.perf_counter()
        ran[name] += authors_loop(ref, x, mask_id=args["mask_id"], steps=args["steps"], temp=args["temp"],
                                  uniform=uniform, amp=amp, max_steps=steps_now)[1]
        _sync(args["device"])
        spent[name] += time.perf_counter() - t0


def _sizes() -> dict[str, dict[str, Any]]:
    """The prior and VQGAN configs benchmarked: the paper's networks and the demo recipe's."""
    demo = load_config("demo")
    return {
        "paper": {"prior": preset("paper"), "vqgan": VQGANConfig()},
        "demo": {"prior": demo.model.prior, "vqgan": demo.model.vqgan},
    }


def bench_sampling(*, device: str = "auto", quick: bool = False, sizes: list[str] | None = None,
                   steps: list[int] | None = None, batch: int | None = None, ref_steps: int | None = None,
                   precision: str = "bf16", compile: bool = False, variants: list[str] | None = None,
                   batches: list[int] | None = None, progress=None) -> dict[str, Any]:
    """Images/s of uvq's sampler against the literal reference; one row per (size, steps, batch, variant).

    Per row: tokens-only images/s, tokens + decoding images/s, network passes per image, peak
    memory, and the reference's images/s with the ratio. The reference runs `ref_steps` steps and
    its time is scaled to the full chain (its every step costs the same: one full pass over the
    batch); uvq's sampler always runs the full chain, since its savings depend on the step.
    `variants` are "eager", "compiled" (torch.compile) and "cuda_graphs" (compile with CUDA
    graphs; CUDA only); the default is ["compiled"] with `compile`, else ["eager"]. A compiled
    variant runs its chain once untimed first, so that compilation stays out of its figure. All
    variants of a (steps, batch) share one reference timing, split around them.
    """
    registry.load()
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    progress = progress or (lambda event: None)
    sizes = sizes or ["paper", "demo"]
    variants = variants or (["compiled"] if compile else ["eager"])
    bad = [v for v in variants if v not in SAMPLING_VARIANTS or (v == "cuda_graphs" and not cuda)]
    if bad:
        raise UserError(f"sampling variant {bad[0]!r} is not one of {', '.join(SAMPLING_VARIANTS)} "
                        "(cuda_graphs needs a CUDA device)")
    table = _sizes()
    rows = []
    for size in sizes:
        pc, vc = table[size]["prior"], table[size]["vqgan"]
        n_tokens = pc.n_tokens
        size_steps = steps or ([50] if quick and size == "paper" else
                               [n_tokens, n_tokens // 2] if quick else
                               [256, 100, 50] if size == "paper" else [n_tokens, 32, 16])
        size_batches = batches or [batch or (256 if cuda else (1 if size == "paper" else 64))]
        torch.manual_seed(0)
        prior = registry.get("priors", pc.name)(pc).to(dev).eval()
        ref = reference_from(prior, pc.n_head).to(dev).eval()
        vqgan = build_vqgan(vc).to(dev).eval()
        for b in size_batches:
            # Warm-up: kernel selection, allocator pools and lazy initialisation stay out of the timings.
            with torch.inference_mode():
                probe = torch.full((b, n_tokens), pc.codebook_size, dtype=torch.long, device=dev)
                prior(probe)
                ref(probe)
                vqgan.decode_codes(torch.zeros((b, *pc.latent_shape), dtype=torch.long, device=dev))
                _sync(dev)
            for s in size_steps:
                s = min(s, n_tokens)
                rows.extend(_sampling_rows(prior, ref, vqgan, pc, dev, size, s, b, variants, precision,
                                           ref_steps, progress))
        del prior, ref, vqgan
    return {"rows": rows, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name(dev) if cuda else None}


SAMPLING_VARIANTS = ("eager", "compiled", "cuda_graphs")


def _sampling_rows(prior, ref, vqgan, pc, dev, size, s, b, variants, precision, ref_steps, progress) -> list[dict]:
    cuda = dev.type == "cuda"
    n_tokens = pc.n_tokens
    progress({"event": "log", "message": f"bench: {size} prior, {s} steps, batch {b} on {dev}, {'/'.join(variants)}"})
    # The reference is timed in two halves, before and after uvq's chains, so that load from
    # other processes on a shared machine weighs on both alike.
    k = min(s, ref_steps or (16 if cuda else (8 if size == "paper" else s)))
    ref_variants = (("fp32", False), ("bf16", True)) if cuda else (("fp32", False),)
    ref_time = {name: 0.0 for name, _ in ref_variants}
    ref_ran = {name: 0 for name, _ in ref_variants}
    ref_args = {"n_tokens": n_tokens, "mask_id": pc.codebook_size, "steps": s, "temp": 1.0, "device": dev}
    _time_reference(ref, b, ref_args, ref_variants, max(1, k // 2), ref_time, ref_ran)
    measured = []
    for variant in variants:
        chain = {"precision": precision, "compile": variant == "compiled", "cuda_graphs": variant == "cuda_graphs"}
        if variant != "eager":  # compile every shape the chain meets, untimed
            list(iter_samples(prior, b, steps=s, temp=1.0, seed=0, batch_size=b, device=dev, **chain))
        _reset_peak(dev)
        stats: dict[str, Any] = {}
        list(iter_samples(prior, b, steps=s, temp=1.0, seed=0, batch_size=b, device=dev, stats=stats, **chain))
        measured.append((variant, stats, _peak_mb(dev)))
    with torch.inference_mode():
        codes = torch.randint(0, pc.codebook_size, (b, *pc.latent_shape), device=dev)
        t0 = time.perf_counter()
        vqgan.decode_codes(codes)
        _sync(dev)
        decode_s = time.perf_counter() - t0
    if k > 1:
        _time_reference(ref, b, ref_args, ref_variants, k - max(1, k // 2), ref_time, ref_ran)
    # its every step costs the same (one full pass), so the chain's time is per step x s
    ref_rows = {name: {"images_per_s": b / (ref_time[name] / ref_ran[name] * s), "steps_timed": ref_ran[name]}
                for name in ref_time}
    rows = []
    for variant, stats, peak in measured:
        tokens_s = stats["tokens_s"]
        row = {
            "size": size, "params_m": round(sum(p.numel() for p in prior.parameters()) / 1e6, 1),
            "tokens": n_tokens, "codes": pc.codebook_size, "steps": s, "batch": b, "device": str(dev),
            "variant": variant, "precision": precision if cuda else "fp32",
            "tokens_images_per_s": b / tokens_s,
            "with_decode_images_per_s": b / (tokens_s + decode_s),
            "decode_images_per_s": b / decode_s,
            "passes_per_image": stats["network_passes"] / b,
            "peak_mb": round(peak, 1),
            "reference": ref_rows,
            "ratio": (b / tokens_s) / ref_rows["fp32"]["images_per_s"],
        }
        if cuda:
            row["ratio_bf16_reference"] = (b / tokens_s) / ref_rows["bf16"]["images_per_s"]
        rows.append(row)
    return rows


def format_table(result: dict[str, Any]) -> str:
    head = (f"{'size':<6} {'steps':>5} {'batch':>5} {'tok img/s':>10} {'+dec img/s':>10} {'passes/img':>10} "
            f"{'peak MB':>8} {'ref img/s':>10} {'ratio':>6}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['size']:<6} {r['steps']:>5} {r['batch']:>5} {r['tokens_images_per_s']:>10.3f} "
                     f"{r['with_decode_images_per_s']:>10.3f} {r['passes_per_image']:>10.1f} {r['peak_mb']:>8.0f} "
                     f"{r['reference']['fp32']['images_per_s']:>10.3f} {r['ratio']:>5.2f}x")
        if "bf16" in r["reference"]:
            lines[-1] += f"  (vs bf16 reference {r['ratio_bf16_reference']:.2f}x)"
    lines.append(f"torch {result['torch']}, {result['threads']} threads"
                 + (f", {result['cuda_device']}" if result["cuda_device"] else "")
                 + "; reference = the authors' loop (fp32, plain attention, network every step), "
                   "timed over its first steps and scaled to the full chain")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# `uvq bench all`: every figure the tool promises, in one process and one report
# ---------------------------------------------------------------------------------------------

# The authors' code (samb-t/unleashing-transformers) measured on one NVIDIA H200 (docs/performance.md).
# key: (value, unit, what ran)
AUTHORS_H200: dict[str, tuple[float, str, str]] = {
    "sample_256_fp32": (3.4, "img/s", "authors' fp32, batch 64"),
    "sample_256_bf16": (10.2, "img/s", "authors' bf16 autocast, batch 64"),
    "sample_50_fp32": (17.3, "img/s", "authors' fp32, batch 64"),
    "sample_50_bf16": (47.1, "img/s", "authors' bf16 autocast, batch 64"),
    "decode": (595.0, "img/s", "authors' decoder, fp32, batch 32"),
    "prior_train_128": (258_000.0, "tokens/s", "authors' bf16 autocast, batch 128"),
    "vqgan_train_4": (55.0, "img/s", "authors' fp32, batch 4"),
    "vqgan_train_16": (81.0, "img/s", "authors' fp16 autocast + GradScaler, batch 16"),
    "canvas_step": (4.2, "s/step", "authors' sample_shape, fp32"),
    "canvas_image": (1076.0, "s/img", "authors' sample_shape, fp32 (1024 steps)"),
}
# Time units: smaller is better, so the ratio to the anchor is anchor / ours (a ratio > 1 is faster).
_TIME_UNITS = ("s/step", "s/img", "s")


def _row(group: str, what: str, setting: str, value: float | None, unit: str, *, here: float | None = None,
         here_label: str = "", anchor: str | None = None, note: str = "") -> dict[str, Any]:
    """One figure: uvq's value, its ratio to the authors' loop in this run, and to the H200 anchor."""
    row: dict[str, Any] = {"group": group, "what": what, "setting": setting, "value": value, "unit": unit,
                           "vs_here": here, "vs_here_label": here_label, "note": note,
                           "anchor": None, "anchor_label": None, "vs_anchor": None}
    if anchor is not None:
        a_value, a_unit, a_label = AUTHORS_H200[anchor]
        row.update(anchor=a_value, anchor_label=a_label)
        if value is not None and a_unit == unit:
            row["vs_anchor"] = a_value / value if unit in _TIME_UNITS else value / a_value
    return row


def _skipped(group: str, what: str, setting: str, unit: str, note: str, anchor: str | None = None) -> dict[str, Any]:
    return _row(group, what, setting, None, unit, anchor=anchor, note=note)


def _group_sampling(dev: torch.device, quick: bool, progress) -> list[dict[str, Any]]:
    cuda = dev.type == "cuda"
    if cuda:
        # eager at every (steps, batch); compiled and CUDA graphs at 50 steps and batch 256 only, where
        # nearly every row reveals at every step, so that few shapes are compiled (minutes each otherwise)
        size = "paper"
        plans = [([50], [64], ["eager", "compiled", "cuda_graphs"])] if quick else \
            [([256, 100, 50], [64, 256], ["eager"]), ([50], [256], ["compiled", "cuda_graphs"])]
    else:
        size = "demo" if quick else "paper"
        plans = [([64, 32, 16], [4], ["eager"])] if quick else [([256, 100, 50], [1], ["eager"])]
    rows = []
    for steps, batches, variants in plans:
        result = bench_sampling(device=str(dev), sizes=[size], steps=steps, batches=batches, variants=variants,
                                ref_steps=(2 if quick else None), precision="bf16", progress=progress)
        for r in result["rows"]:
            prec = r["precision"]
            anchor = f"sample_{r['steps']}_{prec}" if size == "paper" else ""
            rows.append(_row("sampling", f"{r['steps']} steps, tokens", f"{size}, batch {r['batch']}, "
                             f"{r['variant']}, {prec}", r["tokens_images_per_s"], "img/s", here=r["ratio"],
                             here_label="authors' loop fp32", anchor=anchor if anchor in AUTHORS_H200 else None,
                             note=f"{r['passes_per_image']:.0f} passes/img"))
    return rows


def _group_decode(dev: torch.device, quick: bool, progress) -> list[dict[str, Any]]:
    size = "demo" if quick else "paper"
    vc = _sizes()[size]["vqgan"]
    b = 8 if quick or dev.type != "cuda" else 32
    progress({"event": "log", "message": f"bench: decoding, {size} VQGAN, batch {b}"})
    torch.manual_seed(0)
    vqgan = build_vqgan(vc).to(dev).eval()
    side = vc.img_size // vc.downsample
    codes = torch.randint(0, vc.codebook_size, (b, side, side), device=dev)
    repeats = 1 if quick or dev.type != "cuda" else 10
    with torch.inference_mode():
        vqgan.decode_codes(codes)  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(repeats):
            vqgan.decode_codes(codes)
        _sync(dev)
    ips = b * repeats / (time.perf_counter() - t0)
    return [_row("decoding", f"codes to {vc.img_size}x{vc.img_size}", f"{size}, batch {b}, fp32", ips, "img/s",
                 anchor="decode" if size == "paper" else None)]


PRIOR_SIZES = {"paper": "paper", "demo": "demo"}


def bench_prior_train(size: str, impl: str, precision: str, device: torch.device, batch: int, steps: int,
                      warmup: int) -> dict[str, Any]:
    """Tokens/s of full prior training steps (masking, forward, reweighted ELBO, backward, Adam).

    impl "uvq" is AbsorbingTransformer, "reference" the authors' network (separate key, query
    and value Linears, explicit softmax attention; uvq.interop.reference). The median step counts.
    """
    from uvq.interop.reference import AuthorsTransformer
    from uvq.prior.absorbing import AbsorbingDiffusion
    from uvq.prior.model import AbsorbingTransformer, flops_per_token
    from uvq.runtime import amp_context

    pc = preset(size)
    dims = dict(codebook_size=pc.codebook_size, n_tokens=pc.n_tokens, n_embd=pc.n_embd, n_head=pc.n_head,
                n_layer=pc.n_layer)
    torch.manual_seed(0)
    if impl == "uvq":
        model: nn.Module = AbsorbingTransformer(**dims)
    else:
        model = AuthorsTransformer(dims["codebook_size"], dims["n_tokens"], dims["n_embd"], dims["n_head"],
                                   dims["n_layer"])
    model.to(device).train()
    process = AbsorbingDiffusion(pc.n_tokens, pc.codebook_size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randint(0, pc.codebook_size, (batch, pc.n_tokens), generator=g, device=device)

    def step() -> None:
        with amp_context(device, precision):
            out = process.training_loss(model, x0, "reweighted_elbo.v1", g)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    _reset_peak(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]  # the median step: robust to other load on a shared machine
    tokens_per_s = batch * pc.n_tokens / seconds
    train_flops = 3 * flops_per_token(pc.n_embd, pc.n_layer, pc.n_tokens, pc.codebook_size)  # fwd + 2x fwd bwd
    return {"size": size, "impl": impl, "precision": precision, "batch": batch, "tokens_per_s": tokens_per_s,
            "tflops": tokens_per_s * train_flops / 1e12, "step_ms": 1e3 * seconds, "peak_mb": _peak_mb(device)}


def _group_prior_train(dev: torch.device, quick: bool, progress) -> list[dict[str, Any]]:
    cuda = dev.type == "cuda"
    size, batch, prec = ("paper", 128, "bf16") if cuda else ("demo", 8 if quick else 128, "fp32")
    steps, warmup = (2, 1) if quick else ((20, 5) if cuda else (5, 1))
    progress({"event": "log", "message": f"bench: prior training, {size}, batch {batch}, {prec}"})
    ours = bench_prior_train(size, "uvq", prec, dev, batch, steps, warmup)
    ref = bench_prior_train(size, "reference", prec, dev, batch, steps, warmup)
    return [_row("prior training", "reweighted ELBO + Adam", f"{size}, batch {batch}, {prec}", ours["tokens_per_s"],
                 "tokens/s", here=ours["tokens_per_s"] / ref["tokens_per_s"], here_label=f"authors' network {prec}",
                 anchor="prior_train_128" if size == "paper" and batch == 128 else None,
                 note=f"{ours['tflops']:.3g} TFLOP/s")]


@contextlib.contextmanager
def _lpips_weights():
    """Where torchvision's VGG16 file is missing, a stand-in with random weights (same network, so the
    same cost) in a temporary TORCH_HOME, loaded through LPIPS's own path; yields a note."""
    from uvq.vqgan.losses import lpips_trunk_path

    if lpips_trunk_path("vgg").is_file():
        yield f"LPIPS VGG16 from {lpips_trunk_path('vgg')}"
        return
    import torchvision

    old = os.environ.get("TORCH_HOME")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TORCH_HOME"] = tmp
        try:
            path = lpips_trunk_path("vgg")
            path.parent.mkdir(parents=True, exist_ok=True)
            features = torchvision.models.vgg16(weights=None).features.state_dict()
            torch.save({f"features.{k}": v for k, v in features.items()}, path)
            yield "LPIPS VGG16 with random weights (no torchvision file; same cost)"
        finally:
            if old is None:
                os.environ.pop("TORCH_HOME", None)
            else:
                os.environ["TORCH_HOME"] = old


def bench_vqgan_train(recipe: str, batch: int, precision: str, steps: int, warmup: int, device: torch.device,
                      channels_last: bool = True) -> dict[str, Any]:
    """Images/s of the real `fit_vqgan` loop (G step + D step from the first step, EMA), read from its
    metrics.jsonl after `warmup` steps; the median step counts."""
    from uvq.vqgan.train import fit_vqgan

    overrides = [
        "data.source=demo", "data.demo_images=64", "data.val_fraction=0.0", "data.num_workers=0",
        f"train.batch_size={batch}", f"train.steps={warmup + steps}", "train.disc_start_step=0",
        f"train.precision={precision}", f"train.channels_last={str(channels_last).lower()}",
        "run.log_every=1", "run.image_every=1000000", "run.ckpt_every=1000000",
    ]
    cfg = load_config(recipe, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        summary = fit_vqgan(cfg, Path(tmp) / "run", device=str(device))
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in records[warmup:]] or [records[-1]["images_per_s"]]
    return {"recipe": recipe, "batch": batch, "precision": summary["precision"],
            "images_per_s": statistics.median(speeds), "steps_timed": len(speeds)}


def _group_vqgan_train(dev: torch.device, quick: bool, progress) -> list[dict[str, Any]]:
    cuda = dev.type == "cuda"
    recipe = "ffhq" if cuda and not quick else "demo"
    plan = [(4, "fp32", "vqgan_train_4"), (4, "bf16", None), (16, "bf16", None), (16, "fp16", "vqgan_train_16")] \
        if cuda else [(4, "fp32", None), (16, "fp32", None)]
    steps, warmup = (1, 1) if quick else ((20, 5) if cuda else (3, 1))
    rows = []
    with _lpips_weights() as lpips_note:
        for batch, prec, anchor in plan:
            progress({"event": "log", "message": f"bench: VQGAN training, {recipe}, batch {batch}, {prec}"})
            r = bench_vqgan_train(recipe, batch, prec, steps, warmup, dev)
            rows.append(_row("VQGAN training", "G step + D step", f"{recipe}, batch {batch}, {r['precision']}",
                             r["images_per_s"], "img/s", anchor=anchor if recipe == "ffhq" else None,
                             note=lpips_note if recipe == "ffhq" else "demo recipe (no LPIPS)"))
    return rows


def _canvas_prior(quick: bool) -> nn.Module:
    from uvq.prior.model import AbsorbingTransformer

    dims = dict(codebook_size=256, n_tokens=256, n_embd=64, n_head=2, n_layer=2) if quick else \
        dict(codebook_size=1024, n_tokens=256, n_embd=512, n_head=8, n_layer=24)
    torch.manual_seed(0)
    net = AbsorbingTransformer(**dims).eval()
    net.latent_shape = (16, 16)
    return net


def _per_window_loop(net: nn.Module, x: torch.Tensor, windows, k: int, device: torch.device, precision: str):
    """The authors' structure (`sample_shape`): one forward pass per window over the B canvases, then the average."""
    b, n = x.shape
    total = torch.zeros(b, n, k, device=device)
    count = torch.zeros(n, device=device)
    for idx in windows.index.to(device):
        with amp_context(device, precision):
            logits = net(x[:, idx])  # [B, h*w, K]
        total[:, idx] += logits.float().softmax(-1)
        count[idx] += 1
    return (total / count[None, :, None]).log()


def _group_canvas(dev: torch.device, quick: bool, progress) -> list[dict[str, Any]]:
    from uvq.sampling.canvas import WindowMixture, make_windows

    cuda = dev.type == "cuda"
    precision = "bf16" if cuda else "fp32"
    b = 4 if cuda or not quick else 1
    net = _canvas_prior(quick).to(dev)
    k = net.codebook_size
    label = "small prior (width 64, 2 layers)" if quick else "paper prior"
    progress({"event": "log", "message": f"bench: canvas 32x32 latents at stride 1, {label}, {b} canvases"})
    stride = 4 if quick and not cuda else 1  # 25 windows instead of 289: a CPU smoke run
    windows = make_windows((32, 32), (16, 16), stride)
    x = torch.full((b, 32 * 32), k, dtype=torch.long, device=dev)  # all masked: the costliest step
    mixture = WindowMixture(make_predict(net, dev, precision), windows, codebook_size=k, mask_id=k, max_batch=512)
    repeats = 3 if cuda else 1
    with torch.inference_mode():
        ours = _timed(dev, repeats, mixture, x)
        loop = _timed(dev, 1, _per_window_loop, net, x, windows, k, dev, precision)
    setting = f"{'small' if quick else 'paper'}, {len(windows)} windows, {b} canvases, {precision}"
    anchor_ok = not quick and b == 4 and stride == 1
    return [
        _row("canvas", f"512x512 (32x32 latents), stride {stride}", setting, ours, "s/step", here=loop / ours,
             here_label="per-window loop", anchor="canvas_step" if anchor_ok else None),
        _row("canvas", f"512x512 at stride {stride}, 256 steps", setting, ours * 256 / b, "s/img", here=loop / ours,
             here_label="per-window loop", anchor="canvas_image" if anchor_ok else None,
             note="the costliest step x 256; the authors' figure is for their 1024 one-token steps"),
    ]


def _timed(device: torch.device, repeats: int, fn, *args) -> float:
    fn(*args)  # warm-up (kernels, allocator)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def _group_prdc(dev: torch.device, quick: bool, progress) -> list[dict[str, Any]]:
    from uvq.evaluation.metrics import compute_prdc

    n = 2_000 if quick else 50_000
    progress({"event": "log", "message": f"bench: PRDC at {n} x 2048"})
    g = torch.Generator().manual_seed(0)
    real = torch.randn(n, 2048, generator=g)
    fake = torch.randn(n, 2048, generator=g) * 1.02 + 0.02
    _sync(dev)
    t0 = time.perf_counter()
    compute_prdc(real, fake, 5, device=dev)
    _sync(dev)
    return [_row("PRDC", f"{n // 1000}k real x {n // 1000}k fake, k=5", f"2048-d features, {dev.type}",
                 time.perf_counter() - t0, "s", note="exact, chunked (equal to the prdc package)")]


def _group_inception(dev: torch.device, quick: bool, progress) -> list[dict[str, Any]]:
    from uvq.evaluation.features import INCEPTION_URL, InceptionFeatures, default_inception_weights

    path = default_inception_weights()
    what, b = "Inception features (torch-fidelity inception-v3-compat)", (64 if dev.type == "cuda" else 8)
    if not path.is_file():
        return [_skipped("Inception", what, f"batch {b}", "img/s",
                         f"skipped: place {INCEPTION_URL.rsplit('/', 1)[1]} (from {INCEPTION_URL}) at {path}")]
    progress({"event": "log", "message": f"bench: Inception extraction, batch {b}"})
    ex = InceptionFeatures(path, dev)
    images = torch.randint(0, 256, (b, 3, 256, 256), dtype=torch.uint8)
    batches = 1 if quick else (10 if dev.type == "cuda" else 2)
    ex(images[:2])  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(batches):
        ex(images)
    _sync(dev)
    return [_row("Inception", what, f"256x256 uint8, batch {b}", b * batches / (time.perf_counter() - t0), "img/s")]


def cpu_passes(*, quick: bool = False, compile: bool | None = None, repeats: int | None = None,
               progress=None) -> list[dict[str, Any]]:
    """On the CPU, in one run: one network pass of the prior (and one canvas chunk) in fp32 eager,
    under bf16 autocast, compiled (inductor) and in the authors' network, CPU seconds interleaved.

    Each row gives CPU seconds per pass, the ratio to the authors' network, and the largest logit
    difference from fp32 eager. `compile` (default: not with `quick`) adds the compiled pass, whose
    compilation takes minutes on 2 cores and is not counted.
    """
    progress = progress or (lambda event: None)
    compile = (not quick) if compile is None else compile
    size = "demo" if quick else "paper"
    pc = preset(size)
    b = 16 if quick else 1
    repeats = repeats or (3 if quick else 3)
    torch.manual_seed(0)
    net = registry.get("priors", pc.name)(pc).eval()
    ref = reference_from(net, pc.n_head).eval()
    x = torch.randint(0, pc.codebook_size + 1, (b, pc.n_tokens), generator=torch.Generator().manual_seed(1))

    def bf16() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(x)

    passes = {"fp32 eager": lambda: net(x), "bf16 autocast": bf16, "authors' network fp32": lambda: ref(x)}
    if compile:
        progress({"event": "log", "message": "bench: compiling the prior with inductor (minutes on a small CPU)"})
        compiled = torch.compile(net, dynamic=False)
        with torch.inference_mode():
            compiled(x)
        passes["compiled fp32 (inductor)"] = lambda: compiled(x)
    progress({"event": "log", "message": f"bench: CPU passes, {size} prior, batch {b}, {repeats} interleaved rounds"})
    spent = dict.fromkeys(passes, 0.0)
    with torch.inference_mode():
        base = net(x).float()
        diff = {name: float((fn().float() - base).abs().max()) for name, fn in passes.items()}
        for _ in range(repeats):
            for name, fn in passes.items():
                t0 = time.process_time()
                fn()
                spent[name] += time.process_time() - t0
    ref_s = spent["authors' network fp32"] / repeats
    rows = []
    for name in passes:
        sec = spent[name] / repeats
        rows.append(_row("CPU pass", f"prior pass, {name}", f"{size}, batch {b}", sec, "CPU-s",
                         here=ref_s / sec, here_label="authors' network fp32",
                         note=f"largest logit difference from fp32: {diff[name]:.2g}"))
    if not compile:
        rows.append(_skipped("CPU pass", "prior pass, compiled fp32 (inductor)", f"{size}, batch {b}", "CPU-s",
                             "skipped with --quick: inductor takes minutes to compile on a small CPU"))
    return rows + _cpu_canvas_passes(net, pc, repeats)


def _cpu_canvas_passes(net: nn.Module, pc, repeats: int) -> list[dict[str, Any]]:
    """One canvas step (Eq. 8's mixture over every window of an all-masked canvas) in fp32 and under bf16
    autocast, interleaved: the canvas pass is the prior's pass over a batch of windows, plus the mixture."""
    from uvq.sampling.canvas import WindowMixture, make_windows

    h, w = pc.latent_shape
    canvas = (h + h // 4, w + w // 4)  # 2 x 2 windows at stride h/4: a small canvas, the same kind of pass
    windows = make_windows(canvas, (h, w), max(1, h // 4))
    k = pc.codebook_size
    x = torch.full((1, canvas[0] * canvas[1]), k, dtype=torch.long)

    def bf16_net(t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(t)

    mixtures = {"fp32": WindowMixture(net, windows, codebook_size=k, mask_id=k, max_batch=256),
                "bf16 autocast": WindowMixture(bf16_net, windows, codebook_size=k, mask_id=k, max_batch=256)}
    spent = dict.fromkeys(mixtures, 0.0)
    with torch.inference_mode():
        base = mixtures["fp32"](x).float()
        diff = {name: float((m(x).float() - base).abs().max()) for name, m in mixtures.items()}
        for _ in range(repeats):
            for name, m in mixtures.items():
                t0 = time.process_time()
                m(x)
                spent[name] += time.process_time() - t0
    setting = f"{canvas[0]}x{canvas[1]} latents, {len(windows)} windows"
    fp32_s = spent["fp32"] / repeats
    return [_row("CPU pass", f"canvas step, {name}", setting, spent[name] / repeats, "CPU-s",
                 here=fp32_s / (spent[name] / repeats), here_label="fp32",
                 note=f"largest log-mixture difference from fp32: {diff[name]:.2g}") for name in mixtures]


GROUPS = {
    "sampling": _group_sampling,
    "decoding": _group_decode,
    "prior_train": _group_prior_train,
    "vqgan_train": _group_vqgan_train,
    "canvas": _group_canvas,
    "prdc": _group_prdc,
    "inception": _group_inception,
    "cpu": lambda dev, quick, progress: cpu_passes(quick=quick, progress=progress) if dev.type == "cpu" else [],
}


def bench_all(*, device: str = "auto", quick: bool = False, only: list[str] | None = None,
              budget_s: float | None = None, progress=None) -> dict[str, Any]:
    """Every figure uvq promises, in one process: JSON-ready rows with ratios to the authors' code.

    Groups run in the order of GROUPS; once `budget_s` seconds have passed, the groups left are
    listed as skipped (so that the whole suite stays inside its budget: by default 420 s on CUDA,
    leaving a minute of the 8 an H200 run may take for the last group; no limit on the CPU).
    """
    registry.load()
    dev = resolve_device(device)
    progress = progress or (lambda event: None)
    names = list(only or GROUPS)
    bad = [n for n in names if n not in GROUPS]
    if bad:
        raise UserError(f"unknown benchmark group {bad[0]!r}; valid: {', '.join(GROUPS)}")
    if budget_s is None:
        budget_s = 420.0 if dev.type == "cuda" else float("inf")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    timings = {}
    for name in names:
        if time.perf_counter() - start > budget_s:
            rows.append(_skipped(name, "(whole group)", "", "", f"skipped: the {budget_s:.0f}-s budget was spent"))
            continue
        t0 = time.perf_counter()
        rows.extend(GROUPS[name](dev, quick, progress))
        timings[name] = round(time.perf_counter() - t0, 2)
    return {"device": str(dev), "cuda_device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": quick,
            "seconds": round(time.perf_counter() - start, 2), "group_seconds": timings, "rows": rows}


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def format_markdown(result: dict[str, Any]) -> str:
    """The Markdown table of a bench_all result (ratios > 1: uvq is faster)."""
    where = result["cuda_device"] or f"CPU, {result['threads']} threads"
    lines = [f"uvq bench all{' --quick' if result['quick'] else ''}: {where}, torch {result['torch']}, "
             f"{result['seconds']:.0f} s", "",
             "| group | figure | setting | uvq | unit | vs authors here | authors' H200 | vs authors' H200 | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        here = f"{r['vs_here']:.2f}x ({r['vs_here_label']})" if r["vs_here"] is not None else "-"
        anchor = f"{_fmt(r['anchor'])} ({r['anchor_label']})" if r["anchor"] is not None else "-"
        vs = f"{r['vs_anchor']:.2f}x" if r["vs_anchor"] is not None else "-"
        cells = [r["group"], r["what"], r["setting"], _fmt(r["value"]), r["unit"], here, anchor, vs, r["note"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", "vs authors here: against the authors' loop or network in this run; vs authors' H200: against "
              "the authors' code measured on an H200 (docs/performance.md), meaningful on an H200 only."]
    return "\n".join(lines)
