#!/usr/bin/env bash
# Several nodes: run this SAME command on every node; torchrun's c10d rendezvous forms the job.
#   NNODES=2 RDZV_ENDPOINT=node0:29500 scripts/run_multi_node.sh [--dry-run] PROGRAM [args...]
# Env: NNODES (required), RDZV_ENDPOINT host:port of the rendezvous, reachable from all nodes
#      (required), RDZV_ID (job id shared by the nodes, default "torchdist-job"), NPROC (per
#      node, default gpu), MAX_RESTARTS (default 0; use with the program's --resume).
# Nodes with several networks (see README "Several nodes"): NODE_ADDR (this node's address
#      as peers reach it: torchrun --local-addr), NET_IF (the interface gloo and NCCL use:
#      GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME).
source "$(dirname "$0")/_lib.sh"
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; usage_programs; }
parse_launch_args "$@"
: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port, reachable from every node}"
cmd=()
if [[ -n "${NET_IF:-}" ]]; then
  cmd+=(env "GLOO_SOCKET_IFNAME=$NET_IF" "NCCL_SOCKET_IFNAME=$NET_IF")
fi
cmd+=(torchrun --nnodes="$NNODES" --nproc_per_node="${NPROC:-gpu}"
      --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-torchdist-job}")
if [[ -n "${NODE_ADDR:-}" ]]; then cmd+=(--local-addr="$NODE_ADDR"); fi
if [[ -n "${MAX_RESTARTS:-}" ]]; then cmd+=(--max-restarts="$MAX_RESTARTS"); fi
run "${cmd[@]}" "$SCRIPT" "${PASS[@]}"
