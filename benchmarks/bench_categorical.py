"""Cost of the exact categorical draw against one network pass (docs/sampling.md, "Exact draws").

    python benchmarks/bench_categorical.py            # demo and paper-size priors (random weights)
    python benchmarks/bench_categorical.py --batch 2 --repeats 5

For each prior preset it times, interleaved in one run (CPU seconds of this process, or CUDA
wall seconds when run there):
  - one network pass over B samples (all N tokens masked: the largest step of a chain);
  - the exact draw for all B*N tokens: 53-bit uniforms and the float64 inverse CDF;
  - the former float32 draw on the same logits (24-bit uniforms, float32 CDF), for the ratio;
and prints the draw's cost as a fraction of the pass. A chain draws at most B*N tokens per pass,
so this is an upper bound on the draw's share of a step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from uvq.prior.model import AbsorbingTransformer, preset
from uvq.runtime import resolve_device
from uvq.sampling.chain import SampleRNG, categorical


def float32_draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The former draw, for comparison only: float32 softmax and CDF at 24-bit uniforms."""
    cdf = logits.float().softmax(-1).cumsum(-1)
    idx = torch.searchsorted(cdf, u.float()[:, None] * cdf[:, -1:].contiguous(), right=True)
    return idx.clamp_max(logits.shape[-1] - 1).squeeze(1)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def bench(name: str, batch: int, repeats: int, device: torch.device) -> dict:
    cfg = preset(name)
    torch.manual_seed(0)
    net = AbsorbingTransformer(codebook_size=cfg.codebook_size, n_tokens=cfg.n_tokens, n_embd=cfg.n_embd,
                               n_head=cfg.n_head, n_layer=cfg.n_layer).to(device).eval()
    x = torch.full((batch, cfg.n_tokens), cfg.codebook_size, device=device)  # all masked
    rng = SampleRNG(0, range(batch), device)
    times = {"network_pass": 0.0, "exact_draw": 0.0, "float32_draw": 0.0}
    with torch.no_grad():
        logits = net(x).flatten(0, 1) / 0.9  # [B*N, K]
        for _ in range(repeats + 1):  # the first round warms up and is not counted
            t0 = _clock(device)
            net(x)
            t1 = _clock(device)
            categorical(logits, rng.rand(cfg.n_tokens).flatten())
            t2 = _clock(device)
            float32_draw(logits, rng.rand(cfg.n_tokens).flatten())
            t3 = _clock(device)
            if _ == 0:
                continue
            times["network_pass"] += (t1 - t0) / repeats
            times["exact_draw"] += (t2 - t1) / repeats
            times["float32_draw"] += (t3 - t2) / repeats
    return {"prior": name, "batch": batch, "tokens": batch * cfg.n_tokens, "codebook": cfg.codebook_size,
            **{k: round(v, 6) for k, v in times.items()},
            "exact_draw_over_pass": round(times["exact_draw"] / times["network_pass"], 4),
            "exact_over_float32_draw": round(times["exact_draw"] / times["float32_draw"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows = [bench(name, args.batch, args.repeats, device) for name in ("demo", "paper")]
    for r in rows:
        print(f"{r['prior']:>5}: B={r['batch']} ({r['tokens']} tokens, K={r['codebook']}) on {device}: pass "
              f"{r['network_pass']:.4f} s, exact draw {r['exact_draw']:.4f} s "
              f"({100 * r['exact_draw_over_pass']:.2f}% of the pass; {r['exact_over_float32_draw']:.2f}x the "
              f"float32 draw)")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
