"""Provenance records: what made an output (operation, options, input hashes, adapterops version).

`adapterops batch` writes one beside every output and compares it on the next run: an output whose record matches
is current and skipped. Inputs are hashed by content (sha256 of every file, by relative path), so a fresh CI
checkout with new modification times still matches; file hashes are cached by (path, size, mtime) in
~/.cache/adapterops so that large checkpoints are read once per machine. A Hub snapshot is identified by its commit.

Records and the hash cache are files in folders anyone may have prepared (a downloaded output folder, a shared
cache): they are read like every other input, through the file rule (io/paths.py: a regular file inside its
folder, never a FIFO or a device, size-capped) and strict JSON (core/strict_json.py). One that breaks a rule is
treated as absent: no record (so batch will not overwrite that output, and inspect shows none), an empty cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from adapterops.core.strict_json import loads_strict
from adapterops.errors import AdapteropsError
from adapterops.io.atomic import TMP_MARK, atomic_file
from adapterops.io.paths import open_regular, read_regular, safe_file

RECORD_NAME = ".adapterops-provenance.json"
FORMAT = "adapterops-provenance"
_CHUNK = 16 << 20
MAX_RECORD_BYTES = 16 << 20  # a record is a few KB: options, one hash and one path per input
MAX_CACHE_BYTES = 256 << 20  # ~150 bytes per hashed file: over a million files


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
        self.data: dict[str, str] = {}
        try:
            data = loads_strict(read_regular(self.path, MAX_CACHE_BYTES, "hash cache").decode("utf-8"))
        except (AdapteropsError, ValueError):  # missing, not a regular file, too big, not UTF-8, not strict JSON
            data = None
        if isinstance(data, dict):  # anything else (null, [], other values) is no cache: start afresh
            self.data = {k: v for k, v in data.items() if isinstance(v, str)}
        self.dirty = False

    def file_hash(self, path: Path) -> str:
        """The sha256 of one file's bytes (a regular file: a FIFO or device swapped in is an error, not a hang)."""
        fd, st = open_regular(path)
        try:
            key = f"{_key_path(path)}|{st.st_size}|{st.st_mtime_ns}"
            if key not in self.data:
                h = hashlib.sha256()
                while chunk := os.read(fd, _CHUNK):
                    h.update(chunk)
                self.data[key] = h.hexdigest()
                self.dirty = True
        except OSError as exc:
            raise AdapteropsError(f"cannot read: {exc.strerror or exc}", file=path) from None
        finally:
            os.close(fd)
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


def _key_path(path: Path) -> str:
    """The real path as a cache key. A name that is not UTF-8 (held as lone surrogates) would make the whole cache
    unreadable to strict JSON: such a path is keyed by its bytes in hex ("hex:...", never a real path's spelling)."""
    real = os.path.realpath(path)
    try:
        real.encode("utf-8")
    except UnicodeEncodeError:
        return "hex:" + os.fsencode(real).hex()
    return real


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
    for p in sorted(_tree(path)):
        rel = p.relative_to(path).as_posix()
        if not p.is_file() or p.name.endswith(RECORD_NAME) or TMP_MARK in rel:
            continue
        h.update(f"{rel}\0{cache.file_hash(p)}\n".encode("utf-8", "surrogateescape"))  # a non-UTF-8 name: its bytes
    return h.hexdigest()


def _tree(root: Path) -> list[Path]:
    """Everything under a folder, as Path.rglob("*") lists it (symlinked folders are not entered), but with a stack:
    rglob recurses once per level, and a folder nested a thousand levels deep would end in RecursionError."""
    out: list[Path] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except (OSError, ValueError):  # unreadable, gone, not a folder, a NUL in the name
            continue
        for e in entries:
            p = folder / e.name
            out.append(p)
            try:
                if e.is_dir() and not e.is_symlink():
                    stack.append(p)
            except OSError:
                pass
    return out


def make_record(op: str, options: dict[str, Any], inputs: dict[str, list[str]], hashes: dict[str, str], version: str) -> dict[str, Any]:
    """The record for one job: everything that decides its output, and the key that sums it up."""
    body = {"op": op, "options": options, "inputs": {k: [hashes[p] for p in v] for k, v in inputs.items()}, "adapterops": version}
    key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {"format": FORMAT, "version": 1, "key": key, **body, "input_paths": inputs}


def read_provenance(out: Path, file_output: bool = False) -> dict[str, Any] | None:
    """An output's record, or None when it has none, or one that breaks the file rule or strict JSON (a FIFO, a
    symlink out of its folder or to a device, over MAX_RECORD_BYTES, deeply nested, not an object...)."""
    path = record_path(out, file_output)
    try:
        raw = read_regular(safe_file(path.parent, path.name), MAX_RECORD_BYTES, "provenance record")
        data = loads_strict(raw.decode("utf-8"))
    except (AdapteropsError, ValueError):  # UnicodeDecodeError and JSONRefused are ValueErrors
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def write_provenance(out: Path, record: dict[str, Any], file_output: bool = False) -> None:
    """Write an output's record (atomically)."""
    with atomic_file(record_path(out, file_output)) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
