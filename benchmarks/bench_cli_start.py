"""Start-up time of the `uvq` command against `import torch`, in one run.

    python benchmarks/bench_cli_start.py            # 5 runs of each, medians and ratios
    python benchmarks/bench_cli_start.py --runs 9 --json

Each figure is the wall time of a fresh interpreter (`python -m uvq --help`, `python -m uvq
--version`, `python -c "import torch"`), so it includes the interpreter's own start; the goal is
a ratio under 0.1 (issue 10, item 6). The runs are interleaved so that a busy machine slows all
three alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "uvq --help": [sys.executable, "-m", "uvq", "--help"],
    "uvq --version": [sys.executable, "-m", "uvq", "--version"],
    "import torch": [sys.executable, "-c", "import torch"],
}


def wall_time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each command (the median is reported)")
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    args = parser.parse_args()

    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for cmd in COMMANDS.values():  # one untimed run each: warm the file cache
        wall_time(cmd)
    for _ in range(args.runs):
        for name, cmd in COMMANDS.items():
            times[name].append(wall_time(cmd))
    median = {name: statistics.median(t) for name, t in times.items()}
    torch_s = median["import torch"]
    print(f"{'command':<16} {'median s':>9}  {'ratio to import torch':>22}")
    for name, seconds in median.items():
        print(f"{name:<16} {seconds:>9.3f}  {seconds / torch_s:>22.3f}")
    if args.json:
        print(json.dumps({"runs": args.runs, "median_s": median,
                          "ratio": {name: s / torch_s for name, s in median.items() if name != "import torch"}}))


if __name__ == "__main__":
    main()
