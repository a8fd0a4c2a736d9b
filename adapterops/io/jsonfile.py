"""Reading and writing the small JSON files around checkpoints (configs, indexes), with one-line errors.

Every JSON text adapterops reads goes through `core.strict_json.loads_strict` (duplicate keys, lone surrogates,
NaN/Infinity, deep nesting and over-long integers are refused with a reason).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapterops.core.strict_json import loads_strict
from adapterops.errors import AdapteropsError


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or invalid file is an AdapteropsError naming it."""
    try:
        return loads_strict(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapteropsError("file not found", file=path) from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, JSONRefused, over-long integers
        raise AdapteropsError(f"invalid JSON ({exc})", file=path) from None
    except OSError as exc:
        raise AdapteropsError(f"cannot read: {exc.strerror or exc}", file=path) from None


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
