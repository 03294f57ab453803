"""Training throughput and peak memory of the absorbing prior (method section 2).

Measures tokens/s of full training steps (masking, forward, reweighted-ELBO loss, backward, Adam)
at the paper's size (76.8M parameters, 256 tokens, 1024 codes; random weights) and at the demo
recipe's size, for uvq's `AbsorbingTransformer` and, in the same run, for the authors' network
(uvq.interop.reference.AuthorsTransformer: separate key/query/value Linears, explicit softmax
attention; samb-t/unleashing-transformers models/transformer.py). Each measurement runs in
its own process so that its peak memory is its own.

    python benchmarks/bench_prior_train.py            # CPU: small batches, uvq vs reference
    python benchmarks/bench_prior_train.py --quick    # a smoke run: demo size only, few steps
    python benchmarks/bench_prior_train.py --device cuda   # bf16 at batch 128 vs the 258k tokens/s anchor

On CUDA uvq runs under bf16 autocast (the training default) and the reference in fp32 and bf16
autocast; the paper-size row is compared with the authors' 258k tokens/s (bf16 autocast, batch
128, H200; docs/performance.md). Absolute figures are only comparable on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# The authors' code, timed on an H200 (docs/performance.md): bf16 autocast, batch 128.
ANCHOR_TOKENS_PER_S = 258_000

SIZES = {
    # name: (n_embd, n_head, n_layer, codebook_size, n_tokens)
    "paper": (512, 8, 24, 1024, 256),
    "demo": (128, 4, 4, 64, 64),
}


# ---------------------------------------------------------------------------------------------
# One measurement (run in a child process)
# ---------------------------------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(size: str, impl: str, precision: str, device_name: str, batch: int, steps: int, warmup: int) -> dict:
    import torch

    from uvq.interop.reference import AuthorsTransformer
    from uvq.prior.absorbing import AbsorbingDiffusion
    from uvq.prior.model import AbsorbingTransformer, flops_per_token
    from uvq.runtime import amp_context

    n_embd, n_head, n_layer, K, N = SIZES[size]
    device = torch.device(device_name)
    torch.manual_seed(0)
    baseline = _rss_mib()
    if impl == "uvq":
        model = AbsorbingTransformer(codebook_size=K, n_tokens=N, n_embd=n_embd, n_head=n_head, n_layer=n_layer)
    else:
        model = AuthorsTransformer(K, N, n_embd, n_head, n_layer)
    model.to(device).train()
    process = AbsorbingDiffusion(N, K)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randint(0, K, (batch, N), generator=g, device=device)

    def step():
        with amp_context(device, precision):
            out = process.training_loss(model, x0, "reweighted_elbo.v1", g)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    # The median step: robust to other processes on a shared machine.
    seconds = sorted(times)[len(times) // 2]
    tokens_per_s = batch * N / seconds
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    train_flops = 3 * flops_per_token(n_embd, n_layer, N, K)  # forward + backward (2x forward)
    return {"size": size, "impl": impl, "precision": precision, "device": device_name, "batch": batch,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "tokens_per_s": tokens_per_s,
            "tflops": tokens_per_s * train_flops / 1e12, "peak_mib": peak, "step_ms": 1e3 * seconds}


def run_child(spec: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def plan(device: str, quick: bool) -> list[dict]:
    if device.startswith("cuda"):
        batch, steps, warmup = (128, 3, 2) if quick else (128, 20, 5)
        rows = []
        for size in ("paper", "demo"):
            rows.append(dict(size=size, impl="uvq", precision="bf16", batch=batch, steps=steps, warmup=warmup))
            rows.append(dict(size=size, impl="reference", precision="bf16", batch=batch, steps=steps, warmup=warmup))
            rows.append(dict(size=size, impl="reference", precision="fp32", batch=batch, steps=steps, warmup=warmup))
        return rows
    # On the CPU the paper-size step takes many seconds: small batches, few steps; --quick skips it.
    sizes = {"demo": dict(batch=16, steps=3, warmup=1)} if quick else {
        "paper": dict(batch=2, steps=3, warmup=1), "demo": dict(batch=64, steps=9, warmup=2)}
    return [dict(size=s, impl=i, precision="fp32", **cfg) for s, cfg in sizes.items() for i in ("uvq", "reference")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (tiny batches, few steps)")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(**spec)))
        return

    rows = [run_child({**p, "device_name": args.device}) for p in plan(args.device, args.quick)]
    by_key = {(r["size"], r["impl"], r["precision"]): r for r in rows}
    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print(f"prior training throughput on {args.device} (reweighted ELBO, Adam; threads={os.environ.get('OMP_NUM_THREADS', 'default')})")
    print(f"{'size':6} {'impl':10} {'prec':5} {'batch':>5} {'params':>8} {'tokens/s':>11} {'TFLOP/s':>8} "
          f"{'step ms':>9} {'peak MiB':>9} {'vs ref':>7}")
    for r in rows:
        ref = by_key.get((r["size"], "reference", r["precision"])) or by_key.get((r["size"], "reference", "fp32"))
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref and r["impl"] == "uvq" else "-"
        print(f"{r['size']:6} {r['impl']:10} {r['precision']:5} {r['batch']:>5} {r['params_m']:>7.1f}M "
              f"{r['tokens_per_s']:>11,.0f} {r['tflops']:>8.3f} {r['step_ms']:>9.1f} {r['peak_mib']:>9.0f} "
              f"{ratio:>7}")
    if args.device.startswith("cuda"):
        ours = by_key.get(("paper", "uvq", "bf16"))
        if ours:
            print(f"paper size, bf16, batch {ours['batch']}: {ours['tokens_per_s']:,.0f} tokens/s = "
                  f"{ours['tokens_per_s'] / ANCHOR_TOKENS_PER_S:.2f}x the authors' {ANCHOR_TOKENS_PER_S:,} tokens/s (H200 anchor)")
    print("peak MiB: CUDA max_memory_allocated, or on the CPU the process's peak RSS above its size before the model was built")


if __name__ == "__main__":
    main()
