"""Big-canvas sampling speed (Eq. 8): uvq's batched window mixture against a per-window loop.

    python benchmarks/bench_canvas.py              # paper-size prior (76.8M, random weights), bf16 on CUDA
    python benchmarks/bench_canvas.py --quick      # a small prior on the CPU (say so when quoting figures)
    python benchmarks/bench_canvas.py --json       # also one JSON object on stdout

For a 32x32 and a 64x64 latent canvas at stride 1 and stride 4 it measures, in the same run:
  - uvq: one step's prediction (all windows of the B canvases gathered into chunks of
    --batch-windows windows per forward pass) -> seconds per step;
  - the literal loop of the authors' `sample_shape`: one forward pass per window (over the B
    canvases) -> seconds per step;
and prints their ratio and the images/s that follow for a chain of --steps steps (a canvas this
large reveals tokens at every step, so every step costs one prediction; the mixture's per-step cost
is largest at the start, when every window holds a mask, which is what is timed). With
--full-chain (default on CUDA) it also runs uvq's whole chain on the 32x32 canvas at stride 1, the
anchor figure: the authors' code takes 1076 s per 512x512 image on an H200 (docs/performance.md);
the goal is under 10 s with 256 steps or fewer.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from uvq.prior.model import AbsorbingTransformer
from uvq.runtime import amp_context, resolve_device
from uvq.sampling.canvas import WindowMixture, make_windows, sample_canvases
from uvq.sampling.chain import make_predict


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_window_loop(net, x, windows, k, device, precision):
    """The authors' structure: for each window, one forward pass over the B canvases, then the average."""
    b, n = x.shape
    total = torch.zeros(b, n, k, device=device)
    count = torch.zeros(n, device=device)
    for idx in windows.index.to(device):
        with amp_context(device, precision):
            logits = net(x[:, idx])  # [B, h*w, K]
        total[:, idx] += logits.float().softmax(-1)
        count[idx] += 1
    return (total / count[None, :, None]).log()


def timed(device, repeats, fn, *args):
    fn(*args)  # warm-up (kernels, allocator)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small prior (width 64, 2 layers, 256 codes) for the CPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--batch", type=int, default=4, help="canvases sampled together (the anchor uses 4)")
    ap.add_argument("--steps", type=int, default=256, help="step budget of a chain, for images/s")
    ap.add_argument("--batch-windows", type=int, default=512, help="windows per forward pass")
    ap.add_argument("--repeats", type=int, default=None, help="timed repetitions per figure")
    ap.add_argument("--canvases", default="32,64", help="square canvas sides in latents")
    ap.add_argument("--strides", default="1,4")
    ap.add_argument("--full-chain", action=argparse.BooleanOptionalAction, default=None,
                    help="also run uvq's whole chain on the first canvas at the first stride")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    device = resolve_device(args.device)
    if args.quick:
        dims = dict(codebook_size=256, n_tokens=256, n_embd=64, n_head=2, n_layer=2)
        label = "quick: width 64, 2 layers, 256 codes, 16x16 window"
    else:
        dims = dict(codebook_size=1024, n_tokens=256, n_embd=512, n_head=8, n_layer=24)
        label = "paper: 24 layers, width 512, 1024 codes, 16x16 window (76.8M, random weights)"
    torch.manual_seed(0)
    net = AbsorbingTransformer(**dims).to(device).eval()
    net.latent_shape = (16, 16)
    k = dims["codebook_size"]
    repeats = args.repeats or (3 if device.type == "cuda" else 1)
    precision = args.precision if device.type == "cuda" else "fp32"
    full_chain = args.full_chain if args.full_chain is not None else device.type == "cuda"
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{precision}, prior {label}, {args.batch} canvases per batch, chain of {args.steps} steps")
    if device.type == "cpu":
        print("note: CPU figures; on a shared machine they vary with the other load")

    rows = []
    predict = make_predict(net, device, precision)
    for side in (int(s) for s in args.canvases.split(",")):
        for stride in (int(s) for s in args.strides.split(",")):
            windows = make_windows((side, side), (16, 16), stride)
            x = torch.full((args.batch, side * side), k, dtype=torch.long, device=device)  # all masked
            mixture = WindowMixture(predict, windows, codebook_size=k, mask_id=k, max_batch=args.batch_windows)
            with torch.inference_mode():
                ours = timed(device, repeats, mixture, x)
                loop = timed(device, 1, per_window_loop, net, x, windows, k, device, precision)
            row = {"canvas": side, "stride": stride, "windows": len(windows), "uvq_s_per_step": ours,
                   "loop_s_per_step": loop, "ratio": loop / ours,
                   "uvq_images_per_s": args.batch / (ours * args.steps),
                   "loop_images_per_s": args.batch / (loop * args.steps)}
            rows.append(row)
            print(f"{side}x{side} latents, stride {stride}: {len(windows)} windows | uvq {ours:.3f} s/step "
                  f"({row['uvq_images_per_s']:.4g} img/s, {ours * args.steps / args.batch:.1f} s/img) | "
                  f"per-window loop {loop:.3f} s/step ({row['loop_images_per_s']:.4g} img/s) | ratio {row['ratio']:.1f}x",
                  flush=True)

    result = {"device": str(device), "precision": precision, "prior": label, "batch": args.batch,
              "steps": args.steps, "rows": rows}
    if full_chain:
        side, stride = int(args.canvases.split(",")[0]), int(args.strides.split(",")[0])
        _sync(device)
        t0 = time.perf_counter()
        _, stats = sample_canvases(net, args.batch, (side, side), steps=args.steps, temp=0.8, seed=0,
                                   batch_size=args.batch, device=device, stride=stride,
                                   batch_windows=args.batch_windows, precision=precision)
        _sync(device)
        total = time.perf_counter() - t0
        result["full_chain"] = {"canvas": side, "stride": stride, "seconds": total,
                                "seconds_per_image": total / args.batch, "steps": stats.steps,
                                "windows_per_image": stats.windows_evaluated / args.batch}
        print(f"full chain, {side}x{side} latents at stride {stride}, {args.steps} steps: {total:.1f} s for "
              f"{args.batch} canvases = {total / args.batch:.2f} s per image "
              f"(authors' code on an H200: 1076 s per image)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
