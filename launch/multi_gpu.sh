#!/usr/bin/env bash
# One node, one DDP rank per GPU, NCCL. Only local rank 0 prints to the console.
#
#   launch/multi_gpu.sh --epochs 10                       # every visible GPU
#   CUDA_VISIBLE_DEVICES=0,1 launch/multi_gpu.sh          # two of them
#   NPROC=2 BACKEND=gloo launch/multi_gpu.sh --epochs 1   # the same recipe on CPU processes
#
# Everything on the command line goes to train_ddp.py.
# Environment: NPROC (ranks; default: one per visible GPU), BACKEND (default nccl),
# PYTHON (default .venv/bin/python of this checkout, else python3), OMP_NUM_THREADS
# (default: cores / ranks, at least 1), LOG_DIR (also keep every rank's stdout/stderr in
# LOG_DIR/<run id>_<suffix>/attempt_<n>/<local rank>/).
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $root/.venv/bin/python ]]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi

nproc=${NPROC:-gpu}
if [[ $nproc == gpu ]]; then
  # What torchrun's `--nproc-per-node gpu` counts (honours CUDA_VISIBLE_DEVICES).
  nproc=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
  if ((nproc == 0)); then
    echo "error: no CUDA GPU is visible; on CPU run NPROC=2 BACKEND=gloo $0" >&2
    exit 2
  fi
fi
if ! [[ $nproc =~ ^[0-9]+$ ]] || ((nproc < 1)); then
  echo "error: NPROC must be a positive integer or 'gpu', got '$nproc'" >&2
  exit 2
fi

cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)  # macOS has no nproc
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / nproc > 1 ? cores / nproc : 1))}

# --local-ranks-filter 0 sends the other ranks' console output to /dev/null; their error
# reports still reach torchrun's failure summary (train_ddp.main is wrapped in @record).
logs=(--local-ranks-filter 0)
if [[ -n ${LOG_DIR:-} ]]; then
  logs+=(--log-dir "$LOG_DIR" --tee 3)
fi

# --standalone: a private rendezvous on a free localhost port, no port to collide with.
# run_agent.sh passes signals on: TERM, INT, HUP to torchrun, which stops the ranks; USR1,
# USR2 (preemption warnings) to the ranks themselves, which save and stop.
# shellcheck source=launch/run_agent.sh
source "$root/launch/run_agent.sh"
run_agent "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
  "${logs[@]}" "$root/train_ddp.py" --backend "${BACKEND:-nccl}" "$@"
