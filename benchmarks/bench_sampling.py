"""Sampling throughput of uvq against the authors' loop: `uvq bench sample` (arguments passed on).

    python benchmarks/bench_sampling.py            # paper size (steps 256, 100, 50) and demo size
    python benchmarks/bench_sampling.py --quick    # a short CPU smoke run

The whole set of figures (training, decoding, canvas, PRDC, Inception) is `uvq bench all`
(benchmarks/gpu.sh on a GPU machine); docs/performance.md.
"""

from __future__ import annotations

import sys

from uvq.cli.app import main

if __name__ == "__main__":
    main(["bench", "sample", *sys.argv[1:]])
