"""pytest's hooks and fixtures only; the shared paths and helpers live in helpers.py (tests import them there)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# batch's input-hash cache goes to a throwaway folder, never the user's ~/.cache (subprocesses inherit it),
# removed when the session ends
_CACHE = tempfile.mkdtemp(prefix="adapterops-test-cache-")
os.environ["ADAPTEROPS_CACHE"] = _CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """A not-yet-existing output folder."""
    return tmp_path / "out"


@pytest.fixture(scope="session")
def peft_reference(tmp_path_factory):
    """PEFT's merged bytes for each case of cases.json, computed on this machine once per session (tests/references.py
    says why they cannot be stored); skips where peft or transformers is absent."""
    from references import PeftReference, make_fixtures

    make_fixtures()  # skip here, with the reason, rather than at first use
    return PeftReference(tmp_path_factory.mktemp("peft-reference"))


@pytest.fixture(scope="session")
def nf4_checkpoint_reference(tmp_path_factory):
    """The folder with what transformers + bitsandbytes save in NF4 on this CPU (tf-llama-tied, tf-gpt2)."""
    from references import nf4_reference

    return nf4_reference(tmp_path_factory.mktemp("nf4-reference"))
