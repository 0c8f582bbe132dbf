"""The communication study: programs run as `python -m study.NAME`."""
