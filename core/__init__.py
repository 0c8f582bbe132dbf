"""The ground floor: process-group setup, one-line errors and exit statuses, CLI value types,
process helpers. It imports nothing else of this repository."""
