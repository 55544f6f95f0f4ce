#!/usr/bin/env bash
# GPU acceptance check: housing, anomaly and cifar on one CUDA GPU (plain process, torchrun
# with NCCL, --strategy fsdp), cifar's time to 90% and its race against airbench94's recipe,
# bench at world size 1; writes docs/gpu.md.
#   scripts/gpu_check.sh DATA_DIR [--timeout S] [--report FILE]
# Needs only a CUDA PyTorch image (torch, torchvision, pandas, scikit-learn, matplotlib, tqdm):
# the checkout is put on PYTHONPATH, nothing is installed. About 5-8 minutes on one H100.
# CPU dry run of the same commands (the test suite does this): add --device cpu --quick
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec python "$REPO/bench/gpu_check.py" "$@"
