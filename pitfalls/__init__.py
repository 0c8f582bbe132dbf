"""The pitfalls lab: each module reproduces one failure users of DDP hit (`--wrong`) and
runs the fix (`--right`). See pitfalls/README.md."""

# The scripts run under torchrun (pitfalls/unguarded_loader.py is a helper of
# dataloader_spawn, not a pitfall of its own). pitfalls/collective_mismatch.py is not listed:
# it has no --wrong/--right, it starts its own torchrun job, and that job ends in a crash on
# purpose (gloo aborts a rank), which benchmarks/stress_exit.py would count as an abort; its
# variants are tested by tests/test_tools_hangs.py.
SCRIPTS = (
    "batchnorm",
    "clip_grad",
    "dataloader_spawn",
    "loss_normalization",
    "map_location",
    "no_sync",
    "padded_eval",
    "rank0_collective",
    "set_epoch",
    "uneven_inputs",
    "unused_parameters",
)
# The scripts whose --wrong run ends in the failure it demonstrates: exit status 1 (printed
# by rank 0, with an `error:` line). Every other run exits 0.
FAILS_WHEN_WRONG = frozenset(
    {"uneven_inputs", "rank0_collective", "unused_parameters", "map_location", "dataloader_spawn"}
)
