#!/usr/bin/env bash
# The benchmark's GPU rows on one CUDA device, in a few minutes: cache build (images/s against the bare
# encoder), one whole 50-epoch CalibPrompt run cached and with --online-encoding (steps/s), R runs in one
# text pass, a batched grid of 10 runs (5 prompt methods x 2 seeds) against one by one and against one
# encoding pass over a Kather-sized pair, and a 20-trial search with --batch-trials 10.
#
#   benchmarks/gpu.sh            # on the GPU (CUDA_VISIBLE_DEVICES picks it); prints the table
#   benchmarks/gpu.sh --cpu      # smoke check of this script on a CPU: the same rows at the quick sizes
#   benchmarks/gpu.sh --json results.json   # extra options go to python -m benchmarks
set -euo pipefail
cd "$(dirname "$0")/.."
rows="cache,run,pass,grid,tune"
if [[ "${1:-}" == "--cpu" ]]; then
    shift
    exec python -m benchmarks --sizes quick --device cpu --rows "$rows" "$@"
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to torch; run on a GPU node, or pass --cpu for a smoke check" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python -m benchmarks --sizes gpu --device cuda --rows "$rows" "$@"
