#!/usr/bin/env bash
# Training on one machine: torchrun with NPROC_PER_NODE workers (GPUs, or CPU processes over gloo).
#
#   launch/single_node.sh run.dir=runs/exp1                          # all GPUs, data-parallel (1 process on CPU)
#   launch/single_node.sh engine.zero_stage=3 run.dir=runs/exp1      # ZeRO-3 instead of the default ZeRO-2
#   NPROC_PER_NODE=2 launch/single_node.sh run.dir=runs/cpu2         # 2 CPU processes (gloo)
#
# Every argument is a Hydra override for `python -m vlm_train.train` (see conf/ and docs/launching.md). With more
# than one process the default engine (auto) trains with FSDP2 (DeepSpeed for a draft stage) and says so at start;
# engine=single refuses WORLD_SIZE > 1.
#
# Variables:
#   NPROC_PER_NODE  workers (default: the number of visible GPUs, or 1 without CUDA)
#   MAX_RESTARTS    torchrun restarts all workers this many times after a failure (default 0); with the default
#                   train.resume=auto they continue from the last checkpoint
#   TORCHRUN_ARGS   extra torchrun flags, e.g. "--log-dir logs --tee 3"
#   PYTHON          the Python with torch and vlm_train installed (default: python on PATH)
#   STOP_RESEND_S   seconds between repeats of a stop request to the workers (default 15)
# The rendezvous is torchrun --standalone: a free local port, so several runs can share a machine.
#
# SIGTERM or SIGINT (Ctrl-C) makes the workers save a checkpoint and exit 0; Ctrl-C twice kills them.
# The exit status is torchrun's.
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
exit_on_help "$@"

check_max_restarts
nproc=$(nproc_per_node)
# shellcheck disable=SC2206  # TORCHRUN_ARGS is split into flags on purpose
args=(--standalone --nnodes=1 --nproc-per-node="$nproc" --max-restarts="${MAX_RESTARTS:-0}" ${TORCHRUN_ARGS:-})
run_torchrun "${args[@]}" -m vlm_train.train "$@"
