"""Shared paths and helpers for the tests."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from adapterops.io.checkpoint import open_checkpoint
from adapterops.io.safetensors_io import SafetensorsFile

# batch's input-hash cache goes to a throwaway folder, never the user's ~/.cache (subprocesses inherit it)
os.environ["ADAPTEROPS_CACHE"] = tempfile.mkdtemp(prefix="adapterops-test-cache-")

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODELS = FIXTURES / "models"
ADAPTERS = FIXTURES / "adapters"
GOLDEN = FIXTURES / "golden"
CASES = json.loads((GOLDEN / "cases.json").read_text())["cases"]


def read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder or file."""
    ckpt = open_checkpoint(path)
    try:
        return {k: ckpt.read(k).clone() for k in ckpt.keys()}
    finally:
        ckpt.close()


def read_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (copies: reads are memory-mapped, and tests rewrite files)."""
    with SafetensorsFile(path) as f:
        return {k: f.read(k).clone() for k in f.keys()}


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes, for bit-for-bit comparison (NaN-safe, -0.0-safe)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


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
