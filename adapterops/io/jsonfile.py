"""Reading and writing the small JSON files around checkpoints (configs, indexes), with one-line errors.

Every JSON text adapterops reads goes through `core.strict_json.loads_strict` (duplicate keys, lone surrogates,
NaN/Infinity, deep nesting, integers of 2**64 and more, numbers that overflow to infinity are refused with a
reason), and every JSON file is read through `io.paths.read_regular`: a regular file (a FIFO, a device or a socket
is refused even where the caller skipped `safe_file`) of at most MAX_JSON_BYTES.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapterops.core.strict_json import loads_strict
from adapterops.errors import AdapteropsError
from adapterops.io.paths import read_regular

# The largest JSON file adapterops reads is an index of a huge checkpoint (~10 MB for 100k tensors); the cap matches
# the safetensors library's header cap, so a JSON file can never cost more memory than a header may.
MAX_JSON_BYTES = 100_000_000


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing, unreadable, oversized or invalid file is an AdapteropsError naming it."""
    raw = read_regular(path, MAX_JSON_BYTES, "JSON file")
    try:
        return loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, JSONRefused
        raise AdapteropsError(f"invalid JSON ({exc})", file=path) from None


def read_json_object(path: Path) -> dict[str, Any]:
    """Parse a JSON file that must hold an object."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise AdapteropsError(f"expected a JSON object, got {type(data).__name__ if data is not None else 'null'}", file=path)
    return data


def write_json(path: Path, data: Any, *, sort_keys: bool = False) -> None:
    """Write JSON the way transformers does (indent 2, trailing newline)."""
    try:
        path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")
    except OSError as exc:
        raise AdapteropsError(f"cannot write: {exc.strerror or exc}", file=path) from None
