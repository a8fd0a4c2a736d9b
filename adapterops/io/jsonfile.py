"""Reading and writing the small JSON files around checkpoints (configs, indexes), with one-line errors.

Every JSON text adapterops reads goes through `loads_strict`: Python's json module alone accepts things no other
reader agrees on (duplicate keys, where the last silently wins; lone UTF-16 surrogates, which cannot be written
back out; NaN/Infinity; nesting deep enough to exhaust the stack; integers too long to convert). Each is refused
with a reason instead of a traceback or a silent choice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from adapterops.errors import AdapteropsError

MAX_JSON_DEPTH = 512  # configs nest a few levels; serde_json (safetensors' reader) stops at 128


class JSONRefused(ValueError):
    """A JSON text that parses in Python but is refused (duplicate key, lone surrogate, NaN...)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise JSONRefused(f"duplicate key {_show(k)}")
        out[k] = v
    return out


def _show(s: str) -> str:
    """repr() of a string that is safe to print (lone surrogates escaped)."""
    return ascii(s) if any("\ud800" <= c <= "\udfff" for c in s) else repr(s)


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH before parsing (json's C scanner would recurse that deep)."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    depth, in_str, esc = 0, False, False
    for c in text:
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise JSONRefused(f"nested deeper than {MAX_JSON_DEPTH} levels")
        elif c in "]}":
            depth -= 1


def _check_strings(data: Any) -> None:
    """Refuse strings (keys included) holding a lone surrogate: they cannot be encoded as UTF-8 again."""
    stack = [data]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            items: list[Any] = [x]
        elif isinstance(x, dict):
            items = list(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
            continue
        else:
            continue
        for s in items:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise JSONRefused(f"string {_show(s)} holds a lone UTF-16 surrogate") from None


def _no_constant(name: str) -> Any:
    raise JSONRefused(f"{name} is not valid JSON")


def loads_strict(text: str, *, allow_nan: bool = True, pairs: Callable[[list], Any] | None = None) -> Any:
    """json.loads, refusing duplicate keys, lone surrogates, deep nesting (and NaN/Infinity unless allowed).

    `pairs` replaces the duplicate-key refusal: each object is handed over as its list of (key, value) pairs.
    Raises ValueError (JSONDecodeError or JSONRefused) with the reason.
    """
    _check_depth(text)
    try:
        data = json.loads(text, object_pairs_hook=pairs or _no_duplicates,
                          **({} if allow_nan else {"parse_constant": _no_constant}))
    except RecursionError:
        raise JSONRefused("nested too deeply") from None
    _check_strings(data)
    return data


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
