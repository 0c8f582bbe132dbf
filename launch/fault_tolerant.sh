#!/usr/bin/env bash
# A fault-tolerant job on this machine: the coordinator (python -m training.quorum) and N
# replicas, each one its own torchrun of train_ddp.py --fault-tolerance (NPROC_PER_REPLICA
# processes, default 1). A replica that dies is restarted by its torchrun (--max-restarts)
# and rejoins at a step boundary, healed from a live peer; the others go on meanwhile,
# without a restart (docs/fault-tolerance.md).
#
#   launch/fault_tolerant.sh 3 --epochs 1 --out-dir runs/ft    # 3 replicas
#   MIN_REPLICAS=2 launch/fault_tolerant.sh 3 --max-steps 200  # stop below 2 alive
#   NPROC_PER_REPLICA=2 launch/fault_tolerant.sh 2 --epochs 1   # 2 replicas of 2 ranks
#
# Environment: MIN_REPLICAS (the smallest quorum, default 1), HEARTBEAT_TIMEOUT (seconds
# without a heartbeat before a replica is dead, default 2), JOIN_TIMEOUT (default 30),
# MAX_RESTARTS (torchrun restarts per replica, default 3), NPROC_PER_REPLICA (ranks of each
# replica, default 1; a rank that dies takes its replica with it), PYTHON, OMP_NUM_THREADS
# (default: cores / all ranks, at least 1), GLOO_SOCKET_IFNAME (default: the loopback interface).
# Everything listens on loopback only. Exit status: the first failing replica's, else 0; a
# flag the replicas refuse is one `error:` line and status 2 before anything starts.
#
# SIGTERM, SIGINT (Ctrl-C) or SIGHUP stops the job cleanly, as run_agent.sh stops a ddp job
# (and USR1 or USR2, train_ddp.py's --preempt-signal, passed on to the ranks alone):
# the signal goes to every replica's ranks (SIGTERM for SIGHUP) and to the coordinator, not to
# the torchrun agents (signalled themselves, they would print a SignalException traceback and
# exit 1). The ranks finish their step, the coordinator's next quorum stops every replica at
# the same step, one of them writes the checkpoint, all exit 0, and so does this script; the
# same command with --resume auto goes on from there. The coordinator and each agent run in a
# process group of their own (job control), so a Ctrl-C in the terminal reaches this script
# alone, which passes it on once.
#
#   launch/fault_tolerant.sh 3 --max-steps 200 --save-every 50 --out-dir runs/ft --resume auto
#   (the same command for the first start and after every stop: Ctrl-C, again, it goes on)
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $root/.venv/bin/python ]]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi

replicas=${1:-}
if ! [[ $replicas =~ ^[0-9]+$ ]] || ((replicas < 1)); then
  echo "error: usage: launch/fault_tolerant.sh N [train_ddp.py flags], N replicas >= 1, got '${1:-}'" >&2
  exit 2
fi
shift
min=${MIN_REPLICAS:-1}
if ! [[ $min =~ ^[0-9]+$ ]] || ((min < 1 || min > replicas)); then
  echo "error: MIN_REPLICAS must be an integer from 1 to N=$replicas, got '$min'" >&2
  exit 2
fi

per_replica=${NPROC_PER_REPLICA:-1}
if ! [[ $per_replica =~ ^[0-9]+$ ]] || ((per_replica < 1)); then
  echo "error: NPROC_PER_REPLICA must be a positive integer, got '$per_replica'" >&2
  exit 2
fi

cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
all=$((replicas * per_replica))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / all > 1 ? cores / all : 1))}
if [[ -z ${GLOO_SOCKET_IFNAME:-} ]]; then
  case $(uname -s) in
    Darwin) export GLOO_SOCKET_IFNAME=lo0 ;;
    *) export GLOO_SOCKET_IFNAME=lo ;;
  esac
fi
# This checkout's code for `python -m training.quorum` and the flags' check, from any folder
# (a relative --out-dir stays the caller's).
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
# Each torchrun meets its one worker through a file (as in cpu_sim.sh) and serves no store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

# The replicas' flags, checked once here as every replica checks them at its start (and at
# each torchrun restart): a refused one is one `error:` line and exit status 2, before the
# coordinator or any torchrun starts.
"$PYTHON" -c '
import sys
from core.errors import run_cli
from train_ddp import parse_args
from training.fault_tolerant import check_replicas
sys.exit(run_cli(lambda _: check_replicas(parse_args, int(sys.argv[1]), sys.argv[2:])))
' "$replicas" "$@" || exit

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fault_tolerant.XXXXXX")
pids=()
coordinator=
cleanup() {
  local pid
  for pid in "${pids[@]}" $coordinator; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
# A signal for the job, passed on once: to the ranks (each agent's children) and to the
# coordinator; the loops below go on waiting for them to save and leave.
stop() {
  local rank_signal=$1 pid
  echo "fault_tolerant.sh: stopping on SIG$2: every replica finishes its step and one saves" >&2
  for pid in "${pids[@]}"; do
    pkill "-$rank_signal" -P "$pid" || true
  done
  [[ -z $coordinator ]] || kill -TERM "$coordinator" 2>/dev/null || true
}
trap 'trap "" TERM INT HUP; stop TERM TERM' TERM
trap 'trap "" TERM INT HUP; stop INT INT' INT
trap 'trap "" TERM INT HUP; stop TERM HUP' HUP
# USR1, USR2 (--preempt-signal, SLURM's warning): torchrun and the coordinator do not handle
# them (their default action would end them), so everything starts with them ignored, the
# ranks until their handlers are installed; the script passes them on to the ranks.
trap '' USR1 USR2

set -m # the coordinator and each agent in a process group of their own: no Ctrl-C of theirs
"$PYTHON" -m training.quorum --port-file "$tmp/port" --min-replicas "$min" \
  --expect-replicas "$replicas" --heartbeat-timeout "${HEARTBEAT_TIMEOUT:-2}" \
  --join-timeout "${JOIN_TIMEOUT:-30}" &
coordinator=$!
set +m
for _ in $(seq 600); do # up to a minute for torch to load
  [[ -s $tmp/port ]] && break
  kill -0 "$coordinator" 2>/dev/null || {
    echo "error: the coordinator exited before it listened" >&2
    exit 1
  }
  sleep 0.1
done
[[ -s $tmp/port ]] || {
  echo "error: the coordinator did not listen within a minute" >&2
  exit 1
}
port=$(<"$tmp/port")

set -m
for ((i = 0; i < replicas; i++)); do
  "$PYTHON" -m torch.distributed.run --nnodes 1 --nproc-per-node "$per_replica" \
    --max-restarts "${MAX_RESTARTS:-3}" --rdzv-backend c10d --rdzv-endpoint "$tmp/rdzv$i" \
    --rdzv-conf store_type=file --local-addr 127.0.0.1 "$root/train_ddp.py" \
    --fault-tolerance --coordinator "127.0.0.1:$port" --replica-id "$i" "$@" &
  pids+=($!)
done
set +m
for sig in USR1 USR2; do
  # shellcheck disable=SC2064 # $sig is expanded now, on purpose
  trap "for pid in \"\${pids[@]}\"; do pkill -$sig -P \$pid || true; done" "$sig"
done
status=0
for pid in "${pids[@]}"; do
  # `wait` returns early when a trap runs; bash keeps the agent's status for the last one.
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" || true
  done
  code=0
  wait "$pid" || code=$?
  ((status != 0)) || status=$code
done
pids=()
exit "$status"
