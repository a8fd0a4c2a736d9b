"""The package version, in one place (the CLI, batch provenance records and pyproject read it)."""

__version__ = "0.1.0"
