"""Data files shipped with adapterops (architectures.json: see fixtures/make_architectures.py)."""
