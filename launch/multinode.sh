#!/usr/bin/env bash
# Multi-node training: run this once on every node; each runs torchrun with NPROC_PER_NODE workers.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/multinode.sh run.dir=runs/exp1   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/multinode.sh run.dir=runs/exp1   # on node1
#
# Every argument is a Hydra override for `python -m vlm_train.train` (see conf/ and docs/launching.md); several
# processes train data-parallel with FSDP2 (engine=auto; engine=deepspeed for DeepSpeed ZeRO).
#
# Variables (static rendezvous: node 0 hosts the store at MASTER_ADDR:MASTER_PORT):
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank, 0..NNODES-1 (required when NNODES > 1)
#   MASTER_ADDR     address of node 0, reachable from every node (required when NNODES > 1; default 127.0.0.1)
#   MASTER_PORT     a free TCP port on node 0 (default 29500)
#   NPROC_PER_NODE  workers on this node (default: the number of visible GPUs, or 1 without CUDA)
# or a c10d rendezvous (no NODE_RANK, ranks are assigned as nodes join; NNODES may be MIN:MAX):
#   RDZV_ENDPOINT   host:port of the rendezvous store, e.g. node0:29400 (its host serves it)
#   RDZV_ID         a job id shared by all nodes of this run (default vlm_train)
# Both:
#   MAX_RESTARTS    torchrun restarts all workers this many times after a failure (default 0); with the default
#                   train.resume=auto they continue from the last checkpoint
#   TORCHRUN_ARGS   extra torchrun flags, e.g. "--log-dir logs --tee 3"
#   PYTHON          the Python with torch and vlm_train installed (default: python on PATH)
#   STOP_RESEND_S   seconds between repeats of a stop request to the workers (default 15)
#
# SIGTERM or SIGINT (Ctrl-C) makes the workers save a checkpoint and exit 0; every rank stops at the same step even
# when only one node is signalled. Ctrl-C twice kills them. The exit status is torchrun's.
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
exit_on_help "$@"

NNODES=${NNODES:-1}
check_max_restarts
args=()

if [[ -n ${RDZV_ENDPOINT:-} ]]; then
    [[ $NNODES =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "NNODES must be N or MIN:MAX, got '$NNODES'"
    [[ $RDZV_ENDPOINT == *:* ]] || die "RDZV_ENDPOINT must be host:port, got '$RDZV_ENDPOINT'"
    args+=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-vlm_train}")
else
    is_uint "$NNODES" && ((NNODES > 0)) ||
        die "NNODES must be a positive integer, got '$NNODES' (N or MIN:MAX needs RDZV_ENDPOINT)"
    if ((NNODES > 1)); then
        [[ -n ${NODE_RANK:-} ]] ||
            die "NNODES=$NNODES needs NODE_RANK (0 on the node at MASTER_ADDR, 1..$((NNODES - 1)) on the others)," \
                "or set RDZV_ENDPOINT"
        [[ -n ${MASTER_ADDR:-} ]] ||
            die "NNODES=$NNODES needs MASTER_ADDR (the address of node 0), or set RDZV_ENDPOINT"
    fi
    NODE_RANK=${NODE_RANK:-0}
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    MASTER_PORT=${MASTER_PORT:-29500}
    is_uint "$NODE_RANK" && ((NODE_RANK < NNODES)) || die "NODE_RANK must be 0..$((NNODES - 1)), got '$NODE_RANK'"
    is_uint "$MASTER_PORT" && ((MASTER_PORT > 0 && MASTER_PORT < 65536)) ||
        die "MASTER_PORT must be a TCP port, got '$MASTER_PORT'"
    args+=(--nnodes="$NNODES" --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT")
fi

nproc=$(nproc_per_node)
# shellcheck disable=SC2206  # TORCHRUN_ARGS is split into flags on purpose
args+=(--nproc-per-node="$nproc" --max-restarts="${MAX_RESTARTS:-0}" ${TORCHRUN_ARGS:-})
run_torchrun "${args[@]}" -m vlm_train.train "$@"
