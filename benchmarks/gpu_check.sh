#!/usr/bin/env bash
# The GPU run, in one command (under 8 minutes on one recent GPU): throughput of the paper's
# architecture with random weights (paper-random, full size: 512-px input, 64x64 latent,
# 300 DDIM steps of the paper preset) in bf16 and fp32 with B = 1, 8, 32 images per UNet
# batch, the bf16 drift of the heatmaps against fp32 on 4 pairs, and the projected time of
# MS-CXR's 1,160 pairs (the THROUGHPUT lines). Installs nothing: run it where the project is
# installed with a CUDA build of torch (see the Makefile's TORCH).
#
#   benchmarks/gpu_check.sh            # on a machine with a GPU
#   benchmarks/gpu_check.sh --dry-run  # the same steps on the tiny model, on the CPU (~30 s)
#
# PYTHON names the interpreter (default: .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ "${1:-}" == "--dry-run" ]]; then
  export OMP_NUM_THREADS=1
  ARGS=(--models tiny --device cpu --batches 1,2 --dtypes bf16,fp32 --images 2 --steps 10 --drift-pairs 2)
  LIMIT=120
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--dry-run]" >&2
  exit 2
else
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: torch sees no CUDA device (install a CUDA build of torch, or use --dry-run)" >&2
    exit 2
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
  ARGS=(--models paper-random --device cuda --batches 1,8,32 --dtypes bf16,fp32 --images 4 --drift-pairs 4)
  LIMIT=470
fi

echo "gpu_check: $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
start=$SECONDS
timeout "$LIMIT" "$PYTHON" benchmarks/throughput.py "${ARGS[@]}"
echo "gpu_check: done in $((SECONDS - start)) s"
