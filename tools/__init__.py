"""Diagnosis and maintenance programs: `python -m tools.doctor`, `tools.frdiff`,
`tools.convert`."""
