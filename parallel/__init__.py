"""The data-parallel mechanisms, one page each, and the `--sync` factory (factory.py)."""
