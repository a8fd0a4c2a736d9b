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


# ---- huggingface_hub cache layouts and runs of the real command line ----

HUB_LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".adapterops")


def hub_commit(repo_id: str) -> str:
    """A stable 40-hex commit id for a fake repo."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


def hub_etag(path: Path, data: bytes) -> str:
    """The blob name huggingface_hub gives a file: the sha256 of an LFS file, the git blob sha1 of any other."""
    if path.suffix in HUB_LFS_SUFFIXES:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_hub_cache(cache: Path, repo_id: str, src: Path, revision: str = "main") -> Path:
    """Put every file of a folder into a huggingface_hub cache as hf_hub_download lays it out, and return the
    snapshot folder: content in `models--org--name/blobs/<etag>`, `snapshots/<commit>/<path>` a relative symlink
    (`../../blobs/<etag>`, one more `../` per sub-folder), `refs/<revision>` holding the commit."""
    import os

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hub_commit(repo_id)
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = blobs / hub_etag(f, data)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def lstat_tree(root: Path) -> dict[str, str]:
    """{relative path: what it is} for everything under a folder, never opening anything but regular files (a FIFO
    there must not hang the check): a symlink's target, a regular file's sha256, or the kind of anything else."""
    import os
    import stat

    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = p.relative_to(root).as_posix()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = "link:" + os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = f"mode:{stat.S_IFMT(st.st_mode):o}"
    return out


def run_adapterops(args, env: dict | None = None, timeout: float = 180, cwd: Path | None = None):
    """Run the real command line (`python -m adapterops.cli ...`) in a subprocess, with a timeout so that a hang
    fails the test instead of the CI job."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "adapterops", *map(str, args)], env=dict(os.environ, **(env or {})),
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)
