"""Sampling throughput of uvq against the authors' loop; the same as `uvq bench sample`.

    python benchmarks/bench_sampling.py            # paper size (steps 256, 100, 50) and demo size
    python benchmarks/bench_sampling.py --quick    # a short CPU smoke run
    python benchmarks/bench_sampling.py --json     # one JSON object on stdout

Prints images/s for tokens alone and for tokens plus decoding, network passes per image, peak
memory, and the ratio to a literal reference (fp32, plain attention, the network every step).
The goal on 2 CPU cores is >= 1.5x at 256 steps; on an H200, >= 60 images/s at 256 steps and
>= 250 at 50 steps (batch 256, bf16), against 3.4 (fp32) and 10.2 (bf16) for the authors' code.
"""

from __future__ import annotations

import sys

from uvq.cli.app import main

if __name__ == "__main__":
    main(["bench", "sample", *sys.argv[1:]])
