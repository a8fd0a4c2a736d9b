"""Provenance records: what made an output (operation, options, input hashes, adapterops version).

`adapterops batch` writes one beside every output and compares it on the next run: an output whose record matches
is current and skipped. Inputs are hashed by content (sha256 of every file, by relative path), so a fresh CI
checkout with new modification times still matches; file hashes are cached by (path, size, mtime) in
~/.cache/adapterops so that large checkpoints are read once per machine. A Hub snapshot is identified by its commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from adapterops.io.atomic import TMP_MARK, atomic_file

RECORD_NAME = ".adapterops-provenance.json"
FORMAT = "adapterops-provenance"
_CHUNK = 16 << 20


def record_path(out: Path, file_output: bool = False) -> Path:
    """Where an output's record lives: inside an output folder, or beside an output file."""
    out = Path(out)
    return out.parent / f".{out.name}{RECORD_NAME}" if file_output else out / RECORD_NAME


def _cache_file() -> Path:
    """The file-hash cache (ADAPTEROPS_CACHE, else XDG_CACHE_HOME or ~/.cache, /adapterops)."""
    root = os.environ.get("ADAPTEROPS_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "adapterops")
    return Path(root) / "file-hashes.json"


class HashCache:
    """sha256 of files, remembered by (real path, size, mtime_ns)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or _cache_file()
        try:
            self.data: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.dirty = False

    def file_hash(self, path: Path) -> str:
        """The sha256 of one file's bytes."""
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.data:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
            self.data[key] = h.hexdigest()
            self.dirty = True
        return self.data[key]

    def save(self) -> None:
        """Write the cache back (best effort: a read-only home only costs re-hashing)."""
        if not self.dirty:
            return
        try:
            with atomic_file(self.path) as tmp:
                tmp.write_text(json.dumps(self.data))
        except OSError:
            pass


def hash_input(path: Path, cache: HashCache) -> str:
    """A content hash of a file or a folder (every file under it, by relative path; our own records and temporary
    folders excluded). A Hub snapshot folder hashes to its commit."""
    path = Path(path)
    m = re.search(r"/snapshots/([0-9a-f]{40})/?$", str(path))
    if m:
        return f"hub:{m.group(1)}"
    if path.is_file():
        return cache.file_hash(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if not p.is_file() or p.name.endswith(RECORD_NAME) or TMP_MARK in rel:
            continue
        h.update(f"{rel}\0{cache.file_hash(p)}\n".encode())
    return h.hexdigest()


def make_record(op: str, options: dict[str, Any], inputs: dict[str, list[str]], hashes: dict[str, str], version: str) -> dict[str, Any]:
    """The record for one job: everything that decides its output, and the key that sums it up."""
    body = {"op": op, "options": options, "inputs": {k: [hashes[p] for p in v] for k, v in inputs.items()}, "adapterops": version}
    key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {"format": FORMAT, "version": 1, "key": key, **body, "input_paths": inputs}


def read_provenance(out: Path, file_output: bool = False) -> dict[str, Any] | None:
    """An output's record, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads(record_path(out, file_output).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def write_provenance(out: Path, record: dict[str, Any], file_output: bool = False) -> None:
    """Write an output's record (atomically)."""
    with atomic_file(record_path(out, file_output)) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
