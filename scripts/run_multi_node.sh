#!/usr/bin/env bash
# Several nodes: run this SAME command on every node; torchrun's c10d rendezvous forms the job.
#   NNODES=2 RDZV_ENDPOINT=node0:29500 scripts/run_multi_node.sh [--dry-run] PROGRAM [args...]
# Env: NNODES (required), RDZV_ENDPOINT host:port reachable from all nodes (required),
#      RDZV_ID (job id shared by the nodes, default "torchdist-job"), NPROC (per node, default gpu).
source "$(dirname "$0")/_lib.sh"
usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; usage_programs; }
parse_launch_args "$@"
: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port, reachable from every node}"
run torchrun --nnodes="$NNODES" --nproc_per_node="${NPROC:-gpu}" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-torchdist-job}" \
  "$SCRIPT" "${PASS[@]}"
