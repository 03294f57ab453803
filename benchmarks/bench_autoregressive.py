"""Autoregressive sampling with and without the KV cache against absorbing sampling (issue 12 item 1).

    python benchmarks/bench_autoregressive.py              # a small 16x16-token network, batch 8
    python benchmarks/bench_autoregressive.py --paper      # the paper's 76.8M network (slow on a CPU)
    python benchmarks/bench_autoregressive.py --json       # one JSON object on stdout

The same transformer (random weights: speed does not depend on them) runs as a causal network
for the AR sampler (N = 256 steps, one token each) and as a bidirectional one for the paper's
absorbing sampler at 50, 100 and 256 steps. The methods are interleaved within each repeat, so
the ratios come from one run on the same machine load. Figures: seconds per image (CPU seconds
of this process on a CPU, wall seconds on CUDA) and ratios to the cached AR sampler. Never
pass/fail: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from uvq.prior.model import AbsorbingTransformer
from uvq.sampling.autoregressive import autoregressive_tokens
from uvq.sampling.chain import SampleRNG, make_predict, run_chain

SMALL = {"n_embd": 128, "n_head": 4, "n_layer": 4, "codebook_size": 1024, "n_tokens": 256}
PAPER = {"n_embd": 512, "n_head": 8, "n_layer": 24, "codebook_size": 1024, "n_tokens": 256}


def _clock(device: torch.device):
    # CPU seconds of this process on a shared CPU machine; wall seconds (synchronised) on CUDA.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def bench(size: dict, *, batch: int, repeats: int, device: torch.device, precision: str) -> dict:
    torch.manual_seed(0)
    causal = AbsorbingTransformer(**size, causal=True).to(device).eval()
    bidirectional = AbsorbingTransformer(**size).to(device).eval()
    n, k = size["n_tokens"], size["codebook_size"]
    predict = make_predict(bidirectional, device, precision)
    methods = {
        "ar_cached": lambda rng: autoregressive_tokens(causal, torch.full((batch, n), k, device=device), temp=1.0,
                                                       rng=rng, cache=True, device=device, precision=precision),
        "ar_uncached": lambda rng: autoregressive_tokens(causal, torch.full((batch, n), k, device=device), temp=1.0,
                                                         rng=rng, cache=False, device=device, precision=precision),
    }
    for steps in (50, 100, 256):
        methods[f"absorbing_{steps}"] = lambda rng, s=steps: run_chain(
            torch.full((batch, n), k, device=device), predict, mask_id=k, steps=s, temp=1.0, rng=rng)
    seconds = {name: 0.0 for name in methods}
    with torch.inference_mode():
        for fn in methods.values():  # warm-up, untimed
            fn(SampleRNG(0, range(batch), device))
        for r in range(repeats):
            for name, fn in methods.items():
                t0 = _clock(device)
                fn(SampleRNG(r + 1, range(batch), device))
                seconds[name] += _clock(device) - t0
    per_image = {name: s / (repeats * batch) for name, s in seconds.items()}
    base = per_image["ar_cached"]
    return {"device": str(device), "precision": precision, "batch": batch, "repeats": repeats, **size,
            "clock": "wall s (cuda)" if device.type == "cuda" else "CPU s of this process",
            "seconds_per_image": per_image, "ratio_to_ar_cached": {n_: v / base for n_, v in per_image.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper", action="store_true", help="the paper's 76.8M network instead of the small one")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    result = bench(PAPER if args.paper else SMALL, batch=args.batch_size, repeats=args.repeats, device=device,
                   precision="bf16" if device.type == "cuda" else "fp32")
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['n_layer']} layers x {result['n_embd']}, {result['n_tokens']} tokens, K={result['codebook_size']}, "
          f"batch {result['batch']}, {result['repeats']} repeats on {result['device']} ({result['clock']})")
    for name, s in result["seconds_per_image"].items():
        print(f"  {name:14s} {s * 1000:10.1f} ms/image   x{result['ratio_to_ar_cached'][name]:.2f} of ar_cached")


if __name__ == "__main__":
    main()
