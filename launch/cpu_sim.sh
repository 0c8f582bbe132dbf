#!/usr/bin/env bash
# Single-node CPU simulation of a cluster: N processes on this machine, each one a DDP rank,
# joined by the gloo backend over the loopback interface. No GPU, no network.
#
#   launch/cpu_sim.sh                       # 2 ranks, train_ddp.py's defaults
#   launch/cpu_sim.sh 4 --epochs 1          # 4 ranks; everything after N goes to train_ddp.py
#   NPROC=4 launch/cpu_sim.sh --epochs 1    # the same, N from the environment
#
# Environment: NPROC (ranks, default 2), PYTHON (interpreter; default .venv/bin/python of
# this checkout, else python3), OMP_NUM_THREADS (default: cores / ranks, at least 1),
# GLOO_SOCKET_IFNAME (default: the loopback interface).
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $root/.venv/bin/python ]]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi

nproc=${NPROC:-2}
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
  nproc=$1
  shift
fi
if ! [[ $nproc =~ ^[0-9]+$ ]] || ((nproc < 1)); then
  echo "error: the number of ranks must be a positive integer, got '$nproc'" >&2
  exit 2
fi

# torchrun would set OMP_NUM_THREADS=1 (and warn); N ranks sharing the cores is better.
cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)  # macOS has no nproc
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / nproc > 1 ? cores / nproc : 1))}
# gloo binds to the address the host name resolves to, which in containers and on laptops
# with a VPN is often not reachable; the simulation talks over loopback only.
if [[ -z ${GLOO_SOCKET_IFNAME:-} ]]; then
  case $(uname -s) in
    Darwin) export GLOO_SOCKET_IFNAME=lo0 ;;
    *) export GLOO_SOCKET_IFNAME=lo ;;
  esac
fi

# --standalone: a private rendezvous on a free localhost port, so two simulations never clash.
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
  "$root/train_ddp.py" --backend gloo "$@"
