"""The pitfalls lab: each module reproduces one failure users of DDP hit (`--wrong`) and
runs the fix (`--right`). See pitfalls/README.md."""
