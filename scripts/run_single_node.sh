#!/usr/bin/env bash
# One process per GPU on this node (NCCL), or NPROC processes if set.
#   scripts/run_single_node.sh [--dry-run] PROGRAM [program args...]
# Example: scripts/run_single_node.sh cifar --preset airbench94
source "$(dirname "$0")/_lib.sh"
usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; usage_programs; }
parse_launch_args "$@"
# torchrun understands "gpu": as many processes as visible CUDA devices.
run torchrun --standalone --nproc_per_node="${NPROC:-gpu}" "$SCRIPT" "${PASS[@]}"
