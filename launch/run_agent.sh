# shellcheck shell=bash
# Sourced by cpu_sim.sh, multi_gpu.sh and multi_node.sh: `run_agent COMMAND...` runs the
# torchrun agent that COMMAND starts, passes the launcher's signals on, and returns the
# agent's exit status.
#
# torchrun starts each rank in a session (and process group) of its own, so a signal sent to
# this script, or to its process group, reaches no rank by itself. The agent gets a process
# group of its own too (job control, `set -m`): a signal for the launcher's group (Ctrl-C, a
# supervisor that signals the group) then reaches this script alone, and is passed on once:
# - TERM, INT, HUP, USR1, USR2 to the ranks, the agent's children, not to the agent: each
#   rank finishes its step, they agree (every node's ranks, through the step's preemption
#   check), rank 0 saves, all exit 0, and so does the agent, quietly. Signalled itself,
#   torchrun would print a SignalException traceback and exit 1 (docs/launching.md,
#   "Preemption"). Under srun (SLURM_STEP_ID set) slurmstepd signals every process of the
#   job step itself: this script only waits for TERM, INT and HUP, as a second signal would
#   reach the ranks twice.
# - USR1, USR2 (train_ddp.py's preemption warnings, --preempt-signal): torchrun does not
#   handle these two (their default action would end it
#   and leave its ranks training on), so the agent starts with them ignored, and so do its
#   ranks until their handlers are installed; a rank that gets one twice (SLURM signals it
#   directly too) stops all the same.
run_agent() {
  local agent sig status=0
  trap '' USR1 USR2 # inherited by the agent: set before it starts
  set -m
  "$@" &
  agent=$!
  set +m
  for sig in TERM INT HUP; do
    if [[ -n ${SLURM_STEP_ID:-} ]]; then
      trap ':' "$sig"
    else
      # shellcheck disable=SC2064 # $agent and $sig are expanded now, on purpose
      trap "pkill -$sig -P $agent || true" "$sig"
    fi
  done
  for sig in USR1 USR2; do
    # shellcheck disable=SC2064
    trap "pkill -$sig -P $agent || true" "$sig"
  done
  # `wait` returns early when a trap runs; bash keeps the agent's status for the last one.
  while kill -0 "$agent" 2>/dev/null; do
    wait "$agent" || true
  done
  wait "$agent" || status=$?
  return "$status"
}
