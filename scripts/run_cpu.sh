#!/usr/bin/env bash
# N gloo processes on this machine's CPU cores.
#   scripts/run_cpu.sh [--dry-run] PROGRAM [program args...]      NPROC=2 by default
# Example: NPROC=2 scripts/run_cpu.sh housing --data-dir ../shared/data
source "$(dirname "$0")/_lib.sh"
usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; usage_programs; }
parse_launch_args "$@"
NPROC="${NPROC:-2}"
# torchrun sets OMP_NUM_THREADS=1 per worker; common.dist.setup then gives each process
# cores/NPROC threads, so the processes share the cores instead of fighting over them.
run torchrun --standalone --nproc_per_node="$NPROC" "$SCRIPT" --device cpu "${PASS[@]}"
