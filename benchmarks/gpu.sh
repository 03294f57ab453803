#!/usr/bin/env bash
# Every speed figure of uvq on a GPU machine, in one run: `uvq bench all` (about 8 minutes on an
# H200, sized from the authors' figures; not yet run on one), writing bench.json and bench.md (the Markdown table for docs/performance.md) to $OUT_DIR.
#
#   bash benchmarks/gpu.sh                          # -> bench-gpu/bench.{json,md}
#   OUT_DIR=/scratch/bench bash benchmarks/gpu.sh   # elsewhere
#   bash benchmarks/gpu.sh --quick --device cpu     # a smoke run of this script (what the tests run)
#
# Extra arguments go to `uvq bench all`. Place torch-fidelity's Inception weights first if the
# Inception row should run (the table says where); without them that row is skipped, not faked.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT_DIR="${OUT_DIR:-bench-gpu}"
"$PYTHON" -c "import torch; print('torch', torch.__version__, '| CUDA:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
"$PYTHON" -m uvq bench all --out "$OUT_DIR" --overwrite "$@"
echo "wrote $OUT_DIR/bench.json and $OUT_DIR/bench.md"
