"""pytest's hooks and fixtures only; the shared paths and helpers live in helpers.py (tests import them there)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# batch's input-hash cache goes to a throwaway folder, never the user's ~/.cache (subprocesses inherit it)
os.environ["ADAPTEROPS_CACHE"] = tempfile.mkdtemp(prefix="adapterops-test-cache-")


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """A not-yet-existing output folder."""
    return tmp_path / "out"
