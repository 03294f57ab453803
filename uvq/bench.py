"""Benchmarks of the sampler: uvq's chain against the authors' network and loop (uvq.interop.reference),
with figures and ratios (never pass/fail).
"""

from __future__ import annotations

import resource
import time
from typing import Any

import torch
from torch import nn

from uvq.config import VQGANConfig, load_config
from uvq.interop.reference import authors_loop, reference_from
from uvq.prior.model import preset
from uvq.registry import registry
from uvq.runtime import resolve_device
from uvq.sampling.chain import iter_samples
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
                   precision: str = "bf16", compile: bool = False, progress=None) -> dict[str, Any]:
    """Images/s of uvq's sampler against the literal reference; one row per (size, steps).

    Per row: tokens-only images/s, tokens + decoding images/s, network passes per image, peak
    memory, and the reference's images/s with the ratio. The reference runs `ref_steps` steps and
    its time is scaled to the full chain (its every step costs the same: one full pass over the
    batch); uvq's sampler always runs the full chain, since its savings depend on the step.
    """
    registry.load()
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    progress = progress or (lambda event: None)
    sizes = sizes or ["paper", "demo"]
    table = _sizes()
    rows = []
    for size in sizes:
        pc, vc = table[size]["prior"], table[size]["vqgan"]
        n_tokens = pc.n_tokens
        size_steps = steps or ([50] if quick and size == "paper" else
                               [n_tokens, n_tokens // 2] if quick else
                               [256, 100, 50] if size == "paper" else [n_tokens, 32, 16])
        b = batch or (256 if cuda else (1 if size == "paper" else 64))
        torch.manual_seed(0)
        prior = registry.get("priors", pc.name)(pc).to(dev).eval()
        ref = reference_from(prior, pc.n_head).to(dev).eval()
        vqgan = build_vqgan(vc).to(dev).eval()
        # Warm-up: kernel selection, allocator pools and lazy initialisation stay out of the timings.
        with torch.inference_mode():
            probe = torch.full((b, n_tokens), pc.codebook_size, dtype=torch.long, device=dev)
            prior(probe)
            ref(probe)
            vqgan.decode_codes(torch.zeros((b, *pc.latent_shape), dtype=torch.long, device=dev))
            _sync(dev)
        for s in size_steps:
            s = min(s, n_tokens)
            progress({"event": "log", "message": f"bench: {size} prior, {s} steps, batch {b} on {dev}"})
            # The reference is timed in two halves, before and after uvq's chain, so that load
            # from other processes on a shared machine weighs on both alike.
            k = min(s, ref_steps or (16 if cuda else (8 if size == "paper" else s)))
            variants = (("fp32", False), ("bf16", True)) if cuda else (("fp32", False),)
            ref_time = {name: 0.0 for name, _ in variants}
            ref_ran = {name: 0 for name, _ in variants}

            ref_args = {"n_tokens": n_tokens, "mask_id": pc.codebook_size, "steps": s, "temp": 1.0, "device": dev}
            _time_reference(ref, b, ref_args, variants, max(1, k // 2), ref_time, ref_ran)
            # uvq: the full chain, then batched decoding
            _reset_peak(dev)
            stats: dict[str, Any] = {}
            list(iter_samples(prior, b, steps=s, temp=1.0, seed=0, batch_size=b, device=dev, precision=precision,
                              compile=compile, stats=stats))
            tokens_s = stats["tokens_s"]
            with torch.inference_mode():
                codes = torch.randint(0, pc.codebook_size, (b, *pc.latent_shape), device=dev)
                t0 = time.perf_counter()
                vqgan.decode_codes(codes)
                _sync(dev)
                decode_s = time.perf_counter() - t0
            peak = _peak_mb(dev)
            if k > 1:
                _time_reference(ref, b, ref_args, variants, k - max(1, k // 2), ref_time, ref_ran)
            # its every step costs the same (one full pass), so the chain's time is per step x s
            ref_rows = {name: {"images_per_s": b / (ref_time[name] / ref_ran[name] * s), "steps_timed": ref_ran[name]}
                        for name in ref_time}
            row = {
                "size": size, "params_m": round(sum(p.numel() for p in prior.parameters()) / 1e6, 1),
                "tokens": n_tokens, "codes": pc.codebook_size, "steps": s, "batch": b, "device": str(dev),
                "precision": precision if cuda else "fp32",
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
        del prior, ref, vqgan
    return {"rows": rows, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name(dev) if cuda else None}


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
