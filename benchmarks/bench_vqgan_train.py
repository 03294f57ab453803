"""Training throughput of stage one, the VQGAN (method section 1), through the real `fit_vqgan` loop.

One training iteration is what `uvq fit-vqgan` does once the discriminator has started: the
generator step (encoder, quantizer, decoder, L1 + LPIPS(VGG), codebook terms, DiffAugment and the
discriminator on the reconstruction, the adaptive weight's two gradients, backward, Adam) and the
discriminator step (DiffAugment on real and fake, hinge loss, backward, Adam), plus the EMA.
Images/s are read from the run's metrics.jsonl (one window per step, so the checkpoint written at
the end is not counted); the first steps are warm-up (cuDNN autotuning, allocator, data cache).

LPIPS uses the real torchvision VGG16 file when it is in the torch hub cache; otherwise a
stand-in with random weights (the same network, so the same cost) is written to a temporary
TORCH_HOME and loaded through the same path.

    python benchmarks/bench_vqgan_train.py                    # CPU: paper size at batch 1, demo recipe
    python benchmarks/bench_vqgan_train.py --quick            # a smoke run (demo size, few steps)
    python benchmarks/bench_vqgan_train.py --device cuda      # fp32 b4, bf16 b4, bf16 b16, fp16 b16

On CUDA the rows are compared with the authors' code on an H200 (docs/performance.md):
55 images/s in fp32 at batch 4 and 81 images/s under fp16 autocast at batch 16. uvq uses bf16
autocast, channels_last and fused Adam there (the training defaults). Absolute figures are only
comparable on the same machine; the CPU figures below depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The authors' code on one H200 (docs/performance.md), images/s of a full G + D iteration at 256x256, by
# batch size: fp32 at batch 4, fp16 autocast at batch 16. The goal is 2x at the same batch.
ANCHORS = {4: ("fp32", 55.0), 16: ("fp16", 81.0)}
# Sizes are recipes: "paper" = recipes/ffhq.yaml (256x256, nf 128, ch_mult [1,1,2,2,4], 1024 x 256
# codebook, LPIPS weight 1), "demo" = recipes/demo.yaml (32x32, no LPIPS).
RECIPES = {"paper": "ffhq", "demo": "demo"}


def stand_in_vgg(torch_home: Path) -> Path:
    """Write random VGG16 `features.*` weights where LPIPS looks for torchvision's file."""
    import torch
    import torchvision

    from uvq.vqgan.losses import lpips_trunk_path

    os.environ["TORCH_HOME"] = str(torch_home)
    path = lpips_trunk_path("vgg")
    path.parent.mkdir(parents=True, exist_ok=True)
    features = torchvision.models.vgg16(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    return path


def measure(size: str, batch: int, precision: str, steps: int, warmup: int, device: str,
            channels_last: bool = True) -> dict:
    """Run fit_vqgan for warmup + steps iterations (D on from the first) and read its per-step speed."""
    import torch

    from uvq.config import load_config
    from uvq.vqgan.train import fit_vqgan

    recipe = RECIPES[size]
    overrides = [
        "data.source=demo", "data.demo_images=64", "data.val_fraction=0.0", "data.num_workers=0",
        f"train.batch_size={batch}", f"train.steps={warmup + steps}", "train.disc_start_step=0",
        f"train.precision={precision}", f"train.channels_last={str(channels_last).lower()}",
        "run.log_every=1", "run.image_every=1000000",
        "run.ckpt_every=1000000",
    ]
    cfg = load_config(recipe, overrides)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # CPU seconds per step (all threads of this process): on a shared machine the wall clock says
    # how busy the machine was, the CPU time what a step costs.
    marks: list[float] = []

    def on_event(event: dict) -> None:
        if event["event"] == "advance":
            marks.append(time.process_time())

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        summary = fit_vqgan(cfg, Path(tmp) / "run", device=device, progress=on_event)
        wall = time.time() - t0
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in records[warmup:]] or [records[-1]["images_per_s"]]
    ips = statistics.median(speeds)
    cpu = [b - a for a, b in zip(marks[warmup:], marks[warmup + 1:], strict=False)]
    row = {"size": size, "batch": batch, "precision": summary["precision"], "images_per_s": ips,
           "ms_per_step": 1000.0 * batch / ips, "steps_timed": len(speeds), "wall_s": wall,
           "cpu_s_per_step": statistics.median(cpu) if cpu and not cuda else None,
           "device": summary["device"], "channels_last": channels_last and cuda,
           "final_loss": summary["final"].get("loss")}
    if cuda:
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if cuda and size == "paper" and batch in ANCHORS:
        row["anchor"] = f"authors' {ANCHORS[batch][0]} batch {batch}: {ANCHORS[batch][1]:.0f} img/s"
        row["ratio_to_anchor"] = ips / ANCHORS[batch][1]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="demo size only, few steps (a smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    args = ap.parse_args()

    import torch

    from uvq.vqgan.losses import lpips_trunk_path

    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    tmp_home = None
    if not lpips_trunk_path("vgg").is_file():
        tmp_home = tempfile.TemporaryDirectory()
        stand_in_vgg(Path(tmp_home.name))
        lpips_note = "LPIPS: stand-in VGG16 (random weights; same cost)"
    else:
        lpips_note = f"LPIPS: {lpips_trunk_path('vgg')}"

    if args.quick:
        plan = [("demo", 16, "fp32")]
        steps, warmup = args.steps or 3, args.warmup or 1
    elif cuda:
        plan = [("paper", 4, "fp32"), ("paper", 4, "bf16"), ("paper", 16, "bf16"), ("paper", 16, "fp16")]
        steps, warmup = args.steps or 30, args.warmup or 10
    else:
        plan = [("paper", 1, "fp32"), ("demo", 16, "fp32")]
        steps, warmup = args.steps or 3, args.warmup or 1

    print(f"# device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} {lpips_note}",
          file=sys.stderr)
    rows = []
    for size, batch, precision in plan:
        row = measure(size, batch, precision, steps, warmup, args.device)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            extra = ""
            if "ratio_to_anchor" in row:
                extra = f"  x{row['ratio_to_anchor']:.2f} vs {row['anchor']}"
            if "peak_mem_gib" in row:
                extra += f"  peak {row['peak_mem_gib']:.1f} GiB"
            if row["cpu_s_per_step"] is not None:
                extra += f"  {row['cpu_s_per_step']:.2f} CPU-s/step"
            print(f"{size:>5} batch {batch:>3} {row['precision']:>4}: {row['images_per_s']:8.2f} img/s "
                  f"{row['ms_per_step']:9.1f} ms/step ({row['steps_timed']} steps){extra}", flush=True)
    if tmp_home is not None:
        tmp_home.cleanup()


if __name__ == "__main__":
    main()
