"""Reading and writing the small JSON files around checkpoints (configs, indexes), with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapterops.errors import AdapteropsError


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or invalid file is an AdapteropsError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapteropsError("file not found", file=path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapteropsError(f"invalid JSON ({exc})", file=path) from None
    except OSError as exc:
        raise AdapteropsError(f"cannot read: {exc.strerror or exc}", file=path) from None


def read_json_object(path: Path) -> dict[str, Any]:
    """Parse a JSON file that must hold an object."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise AdapteropsError("expected a JSON object", file=path)
    return data


def write_json(path: Path, data: Any, *, sort_keys: bool = False) -> None:
    """Write JSON the way transformers does (indent 2, trailing newline)."""
    try:
        path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")
    except OSError as exc:
        raise AdapteropsError(f"cannot write: {exc.strerror or exc}", file=path) from None
