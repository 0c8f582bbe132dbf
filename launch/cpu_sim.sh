#!/usr/bin/env bash
# Single-node CPU simulation of a cluster: N processes on this machine, each one a DDP rank,
# joined by the gloo backend over the loopback interface. No GPU, no network: nothing it
# starts listens beyond loopback.
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

# Nothing listens beyond loopback. `--standalone` would start a TCPStore in the torchrun
# agent, and TCPStore listens on every interface whatever address it is given: anyone who
# can reach this machine could read and write the job's keys. Instead the agent meets its
# workers through a file (c10d rendezvous with store_type=file: a private temporary file,
# removed by this script at exit, so two simulations never clash), serves no store of its own
# (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; see multi_node.sh for what it does on restarts), and
# tells the workers MASTER_ADDR=127.0.0.1 (--local-addr) with a free port; rank 0 then opens
# the workers' store on 127.0.0.1 only (core/dist.py: loopback_store), and gloo talks over
# GLOO_SOCKET_IFNAME (lo). docs/launching.md lists what listens where.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
rdzv_file=$(mktemp "${TMPDIR:-/tmp}/cpu_sim_rdzv.XXXXXX")  # mode 600; removed at exit
trap 'rm -f "$rdzv_file"' EXIT
# Not exec'd: the file must be removed after it, and signals must be passed on to the ranks
# (run_agent.sh): a Ctrl-C stops them after their step, with a checkpoint, and torchrun
# ends quietly, as after any run.
# shellcheck source=launch/run_agent.sh
source "$root/launch/run_agent.sh"
run_agent "$PYTHON" -m torch.distributed.run --nnodes 1 --nproc-per-node "$nproc" \
  --rdzv-backend c10d --rdzv-endpoint "$rdzv_file" --rdzv-conf store_type=file \
  --local-addr 127.0.0.1 "$root/train_ddp.py" --backend gloo "$@"
