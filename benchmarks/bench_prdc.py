"""PRDC time and peak memory: uvq's chunked exact PRDC against the `prdc` package; Inception throughput.

Each measurement runs in its own subprocess so that peak memory (ru_maxrss) belongs to it alone.

    .venv/bin/python benchmarks/bench_prdc.py                     # prdc vs uvq at 10k, uvq at 50k, extraction
    .venv/bin/python benchmarks/bench_prdc.py --sizes 10000 --skip-extract
    .venv/bin/python benchmarks/bench_prdc.py --device cuda

Figures are printed as a table plus one JSON line. Features are random normal [N, 2048] float32
(real and fake shifted apart), which is the worst case for the exactness checks: distances in
2048 dimensions concentrate, so many comparisons fall near a radius.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import subprocess
import sys
import time

DIM = 2048


def _features(n: int, seed: int, shift: float):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, DIM), dtype=np.float32) * (1.0 + shift) + shift).astype(np.float32)


def child(spec: dict) -> dict:
    """One measurement, in this process: returns seconds, peak RSS and the metrics."""
    import numpy as np
    import torch

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if spec["what"] == "extract":
        return _child_extract(spec)
    real, fake = _features(spec["n"], 0, 0.0), _features(spec["n"], 1, 0.02)
    data_mb = (real.nbytes + fake.nbytes) / 2**20
    t0 = time.perf_counter()
    if spec["what"] == "prdc":
        import prdc

        with contextlib.redirect_stdout(io.StringIO()):
            out = {k: float(v) for k, v in prdc.compute_prdc(real, fake, spec["k"]).items()}
    else:
        from uvq.evaluation.metrics import compute_prdc

        out = compute_prdc(real, fake, spec["k"], device=spec["device"])
        if spec["device"].startswith("cuda"):
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"what": spec["what"], "n": spec["n"], "k": spec["k"], "device": spec["device"], "seconds": seconds,
              "peak_rss_mb": peak / 1024, "rss_above_start_mb": (peak - base) / 1024, "features_mb": data_mb,
              "metrics": out}
    if spec["device"].startswith("cuda"):
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    del np
    return result


def _child_extract(spec: dict) -> dict:
    """Images/s of the inception-v3-compat extractor with random weights (256x256 uint8 inputs)."""
    import tempfile
    from pathlib import Path
    from unittest import mock

    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    from uvq.evaluation.features import InceptionFeatures

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        module = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inception-random.pth"
        torch.save(module.state_dict(), path)
        ex = InceptionFeatures(path, spec["device"])
    x = torch.randint(0, 256, (spec["batch"], 3, 256, 256), dtype=torch.uint8)
    ex(x[:2])  # warm-up
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(spec["batches"]):
        ex(x)
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"what": "extract", "device": spec["device"], "batch": spec["batch"], "images": spec["batch"] * spec["batches"],
            "seconds": seconds, "images_per_s": spec["batch"] * spec["batches"] / seconds, "threads": torch.get_num_threads()}


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        row = {**spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    else:
        row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps({"row": row}), file=sys.stderr, flush=True)  # each figure as soon as it exists
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000], help="N for the prdc-vs-uvq comparison.")
    ap.add_argument("--large", type=int, default=50_000, help="N for uvq alone (0 to skip).")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-extract", action="store_true")
    ap.add_argument("--extract-batch", type=int, default=8)
    ap.add_argument("--extract-batches", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    rows = []
    for n in args.sizes:
        rows.append(run_child({"what": "prdc", "n": n, "k": args.k, "device": "cpu"}))
        rows.append(run_child({"what": "uvq", "n": n, "k": args.k, "device": args.device}))
    if not args.skip_extract:
        rows.append(run_child({"what": "extract", "device": args.device, "batch": args.extract_batch,
                               "batches": args.extract_batches}))
    if args.large:
        rows.append(run_child({"what": "uvq", "n": args.large, "k": args.k, "device": args.device}))

    print(f"{'what':8} {'N':>7} {'device':7} {'seconds':>9} {'peak RSS MB':>12} {'features MB':>12}  metrics")
    for r in rows:
        if "error" in r:
            print(f"{r['what']:8} {r.get('n', ''):>7} error: {r['error']}")
        elif r["what"] == "extract":
            print(f"{'extract':8} {r['images']:>7} {r['device']:7} {r['seconds']:9.2f} {'':>12} {'':>12}  "
                  f"{r['images_per_s']:.2f} img/s (256x256 -> 299, batch {r['batch']}, {r['threads']} threads)")
        else:
            m = " ".join(f"{k[0]}={v:.4f}" for k, v in r["metrics"].items())
            print(f"{r['what']:8} {r['n']:>7} {r['device']:7} {r['seconds']:9.2f} {r['peak_rss_mb']:12.0f} "
                  f"{r['features_mb']:12.0f}  {m}")
    by = {(r["what"], r.get("n")): r for r in rows if "error" not in r}
    for n in args.sizes:
        a, b = by.get(("prdc", n)), by.get(("uvq", n))
        if a and b:
            same = all(abs(a["metrics"][k] - b["metrics"][k]) < 1e-9 for k in a["metrics"])
            print(f"N={n}: time prdc/uvq = {a['seconds'] / b['seconds']:.2f}x, peak RSS prdc/uvq = "
                  f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x, identical metrics: {same}")
    print(json.dumps({"bench": "prdc", "rows": rows}))


if __name__ == "__main__":
    main()
