"""Strict JSON text parsing, no files: what every JSON text adapterops reads must pass.

Python's json module alone accepts things no other reader agrees on (duplicate keys, where the last silently wins;
lone UTF-16 surrogates, which cannot be written back out; NaN/Infinity; nesting deep enough to exhaust the stack;
integers too long to convert). `loads_strict` refuses each with a reason (a ValueError) instead of a traceback or
a silent choice. io/jsonfile.py reads files with it; core/nf4.py parses quant-state JSON with it.
"""

from __future__ import annotations

import json
from typing import Any, Callable

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
