#!/usr/bin/env bash
# Several nodes: run this once on every node, with the same settings. The torchrun agents
# meet at RDZV_ENDPOINT (c10d rendezvous: the node whose address that is hosts the store),
# agree on the world, and each starts NPROC ranks on its node.
#
#   # on every node of a fixed-size 2-node job; node0 is any one of them
#   NNODES=2 RDZV_ENDPOINT=node0:29400 RDZV_ID=exp1 launch/multi_node.sh --epochs 10
#   # after a failure, restart every rank (up to 3 times) from the last checkpoint
#   NNODES=2 MAX_RESTARTS=3 RDZV_ENDPOINT=node0:29400 RDZV_ID=exp2 \
#     launch/multi_node.sh --epochs 10 --resume auto
#   # elastic size: start with the 2 to 4 nodes that have joined
#   NNODES=2:4 RDZV_ENDPOINT=node0:29400 RDZV_ID=exp3 launch/multi_node.sh --epochs 10
#
# Everything on the command line goes to train_ddp.py. Node ranks come from the rendezvous
# (torchrun's --node-rank only applies to its static rendezvous), so every node runs the
# same command. Pick the port yourself (29400 is torchrun's default for c10d): it must be
# free on the RDZV_ENDPOINT node and reachable from the others.
#
# Environment: NNODES (N, or MIN:MAX for an elastic job; required), RDZV_ENDPOINT
# (host:port; required), RDZV_ID (the job's name, the same on every node; default ddp),
# NPROC (ranks per node; default: one per visible GPU), BACKEND (default nccl),
# IFNAME (network interface the ranks talk over: sets GLOO_SOCKET_IFNAME and
# NCCL_SOCKET_IFNAME unless they are set, and LOCAL_ADDR to its IPv4 address), LOCAL_ADDR
# (the address this node gives the others; torchrun --local-addr), MAX_RESTARTS (default
# 0), RDZV_CONF (torchrun's --rdzv-conf, e.g. is_host=1), PYTHON, OMP_NUM_THREADS, LOG_DIR
# (as in multi_gpu.sh).
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $root/.venv/bin/python ]]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi

if ! [[ ${NNODES:-} =~ ^[0-9]+(:[0-9]+)?$ ]]; then
  echo "error: set NNODES to the number of nodes (e.g. 2) or a range MIN:MAX (e.g. 2:4)" >&2
  exit 2
fi
if ! [[ ${RDZV_ENDPOINT:-} =~ ^[^:]+:[0-9]+$ ]]; then
  echo "error: set RDZV_ENDPOINT to host:port of the node that hosts the rendezvous" \
    "(e.g. node0:29400)" >&2
  exit 2
fi

nproc=${NPROC:-gpu}
if [[ $nproc == gpu ]]; then
  nproc=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
  if ((nproc == 0)); then
    echo "error: no CUDA GPU is visible on $(hostname); on CPU set NPROC=1 BACKEND=gloo" >&2
    exit 2
  fi
fi
if ! [[ $nproc =~ ^[0-9]+$ ]] || ((nproc < 1)); then
  echo "error: NPROC must be a positive integer or 'gpu', got '$nproc'" >&2
  exit 2
fi

cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)  # macOS has no nproc
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / nproc > 1 ? cores / nproc : 1))}
# Without IFNAME, gloo and NCCL use the address the host name resolves to, and torchrun
# tells the other nodes this node's fully qualified host name. On many clusters that is a
# management network (or a docker bridge, or localhost) the other nodes cannot reach.
if [[ -n ${IFNAME:-} ]]; then
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$IFNAME}
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$IFNAME}
  if [[ -z ${LOCAL_ADDR:-} ]] && command -v ip >/dev/null; then
    LOCAL_ADDR=$(ip -o -4 addr show dev "$IFNAME" 2>/dev/null |
      awk '{sub("/.*", "", $4); print $4; exit}') || true
  fi
  if [[ -z ${LOCAL_ADDR:-} ]]; then
    echo "error: IFNAME=$IFNAME: found no IPv4 address of that interface (ip -4 addr);" \
      "set LOCAL_ADDR to this node's address on it" >&2
    exit 2
  fi
fi

rdzv=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-ddp}")
if [[ -n ${LOCAL_ADDR:-} ]]; then
  rdzv+=(--local-addr "$LOCAL_ADDR")
  # torchrun decides whether it hosts the rendezvous store by comparing the endpoint with
  # its host name and the addresses that name resolves to; the address of a second network
  # card is not among them, and then no node hosts the store. (Loopback it recognises, and
  # there several agents on one machine share the address: the first one hosts.)
  if [[ -z ${RDZV_CONF:-} && ${RDZV_ENDPOINT%:*} == "$LOCAL_ADDR" && $LOCAL_ADDR != 127.* ]]; then
    RDZV_CONF=is_host=1
  fi
fi
if [[ -n ${RDZV_CONF:-} ]]; then
  rdzv+=(--rdzv-conf "$RDZV_CONF")
fi
logs=(--local-ranks-filter 0)
if [[ -n ${LOG_DIR:-} ]]; then
  logs+=(--log-dir "$LOG_DIR" --tee 3)
fi

# Restarts (MAX_RESTARTS): by default torchrun (2.4+) lets the workers use the rendezvous
# TCPStore that node 0's agent serves, and that store outlives a failed attempt: the
# restarted workers' process group keys are written next to the dead attempt's (torch adds
# no per-attempt prefix for that store, torch/distributed/rendezvous.py), and gloo can
# then dial a dead worker's address ("Gloo connectFullMesh failed ... Connection refused"),
# failing restart after restart (3 of 6 kill trials in issue 18). With
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 the agents only publish MASTER_ADDR and a free
# MASTER_PORT, and each attempt's rank 0 starts a fresh store there: nothing of a dead
# attempt is read again (tests/test_launch_restarts.py: kill trials end bit-identical).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# Signals are passed on (run_agent.sh): TERM, INT, HUP to torchrun, which stops the ranks;
# SIGUSR1 and SIGUSR2, train_ddp.py's preemption warnings (--preempt-signal), to the ranks
# themselves, which save and stop. torchrun ignores those two: under SLURM, which sends them
# to every process of the job step, the agent must not die of them.
# shellcheck source=launch/run_agent.sh
source "$root/launch/run_agent.sh"
run_agent "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc-per-node "$nproc" \
  "${rdzv[@]}" --max-restarts "${MAX_RESTARTS:-0}" "${logs[@]}" \
  "$root/train_ddp.py" --backend "${BACKEND:-nccl}" "$@"
