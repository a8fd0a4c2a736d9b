"""Shared paths, readers and builders for the tests: fixture locations, reading every tensor, and copies of fixtures
with one thing wrong."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from adapterops.io.checkpoint import open_checkpoint
from adapterops.io.safetensors_io import SafetensorsFile

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


MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def copy_fixture(kind: str, name: str, dest: Path) -> Path:
    """A writable copy of a fixture model or adapter folder."""
    src = (MODELS if kind == "model" else ADAPTERS) / name
    target = dest / f"{kind}-{name}"
    shutil.copytree(src, target)
    return target


def edit_json(path: Path, **changes: object) -> None:
    """Update keys of a JSON file in place."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


def tree_hash(path: Path) -> str:
    """A hash of every file's name and bytes under a folder."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def leftovers(parent: Path) -> list[str]:
    """Anything a run left in the output's parent folder (outputs or temporary folders)."""
    return sorted(p.name for p in parent.iterdir() if p.name == "out" or ".adapterops-tmp-" in p.name)


def adapter_with_tensors(tmp_path: Path, name: str, edit) -> Path:
    """A copy of a fixture adapter whose tensors dict has been changed by `edit(tensors)`."""

    from adapterops.io.safetensors_io import save_file

    ad = copy_fixture("adapter", name, tmp_path)
    path = ad / "adapter_model.safetensors"
    tensors = read_file(path)
    edit(tensors)
    save_file(tensors, path)
    return ad


def file_hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under a folder (or of one file)."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |x| (float64), subnormals included."""
    mant = MANTISSA[dtype]
    _, e = torch.frexp(x.double().abs())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), e - mant - 1).clamp(min=torch.finfo(dtype).smallest_normal * 2.0**-mant)
