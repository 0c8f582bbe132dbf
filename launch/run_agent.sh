# shellcheck shell=bash
# Sourced by cpu_sim.sh, multi_gpu.sh and multi_node.sh: `run_agent COMMAND...` runs the
# torchrun agent that COMMAND starts, passes the launcher's signals on, and returns the
# agent's exit status.
#
# torchrun starts each rank in a session (and process group) of its own, so a signal sent to
# this script, or to its process group, reaches no rank by itself:
# - TERM, INT, HUP go to the agent, which sends them to every rank's process group, waits for
#   its ranks (--shutdown-timeout) and exits 1 (docs/launching.md, "Preemption").
# - USR1, USR2 (train_ddp.py's preemption warnings, --preempt-signal) go to the ranks, the
#   agent's children: each finishes its step, they agree, rank 0 saves, all exit 0, and so
#   does the agent. torchrun does not handle these two (their default action would end it
#   and leave its ranks training on), so the agent starts with them ignored, and so do its
#   ranks until their handlers are installed; SLURM, which signals every process of the
#   job step, then reaches the ranks directly as well as through this script.
run_agent() {
  local agent status=0
  trap '' USR1 USR2 # inherited by the agent: set before it starts
  "$@" &
  agent=$!
  # shellcheck disable=SC2064 # $agent is expanded now, on purpose
  trap "kill -TERM $agent 2>/dev/null || true" TERM INT HUP
  # shellcheck disable=SC2064
  trap "pkill -USR1 -P $agent || true" USR1
  # shellcheck disable=SC2064
  trap "pkill -USR2 -P $agent || true" USR2
  # `wait` returns early when a trap runs; bash keeps the agent's status for the last one.
  while kill -0 "$agent" 2>/dev/null; do
    wait "$agent" || true
  done
  wait "$agent" || status=$?
  return "$status"
}
