"""Strict JSON text parsing, no files: what every JSON text adapterops reads must pass.

Python's json module alone accepts things no other reader agrees on (duplicate keys, where the last silently wins;
lone UTF-16 surrogates, which cannot be written back out; NaN/Infinity; nesting deep enough to exhaust the stack of
whatever walks the result; integers of hundreds of digits, which later overflow `math.isfinite` or float(); numbers
such as 1e400 that silently become infinity). `loads_strict` refuses each with a reason (a ValueError) instead of a
traceback or a silent choice. io/jsonfile.py reads files with it, io/safetensors_io.py headers, io/provenance.py
batch records and core/nf4.py quant-state JSON: no JSON text from outside the package is parsed any other way.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any, Callable

# Real configs, indexes and headers nest fewer than 10 levels; serde_json (safetensors' reader) stops at 128. The
# parsed result is walked recursively (dataclasses.asdict, copy.deepcopy, our own helpers: up to ~3 frames a
# level), so the bound must stay far below Python's recursion limit of 1000 whatever stack the caller already has.
MAX_JSON_DEPTH = 64

# Every integer adapterops reads is a u64 at most: safetensors offsets and dimensions (usize), ranks, alphas, sizes.
# Anything from 2**64 on is a lie, and a long one breaks later arithmetic (math.isfinite(10**400) overflows), so
# the parser refuses it; more than 20 digits is refused before conversion (int() of a long string is quadratic).
INT_LIMIT = 2**64
_INT_DIGITS = len(str(INT_LIMIT))  # 20


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


# A JSON string, as json's scanner reads it: a quote, then runs of ordinary characters or a backslash and the
# character it escapes, then the closing quote. Possessive (no backtracking) and with the closing quote optional,
# so that an unterminated string is one match to the end of the text, never a rescan: linear time on any input.
_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH before parsing (the result must be safe to walk recursively).

    Brackets inside strings do not count. Every loop runs in C (re, map, accumulate): about 15 ms a megabyte, where
    the character loop this replaces took ten times as long.
    """
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    steps = map(_STEP.__getitem__, _BRACKET.findall(_STRING.sub("", text)))
    if max(accumulate(steps), default=0) > MAX_JSON_DEPTH:
        raise JSONRefused(f"nested deeper than {MAX_JSON_DEPTH} levels")


def _int(digits: str) -> int:
    """parse_int: an integer below 2**64 in absolute value (see INT_LIMIT), else refused."""
    n = len(digits) - digits.startswith("-")
    if n > _INT_DIGITS:
        raise JSONRefused(f"integer with {n} digits is out of range: integers must be below 2**64")
    value = int(digits)
    if abs(value) >= INT_LIMIT:
        raise JSONRefused(f"integer {digits} is out of range: integers must be below 2**64")
    return value


def _float(text: str) -> float:
    """parse_float: a number that stays finite as a float (1e400 would silently become infinity)."""
    value = float(text)
    if math.isinf(value):
        shown = text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"
        raise JSONRefused(f"number {shown} is out of range: over the largest float, about 1.8e308")
    return value


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
    """json.loads, refusing duplicate keys, lone surrogates, nesting deeper than MAX_JSON_DEPTH, integers of 2**64
    or more in absolute value, numbers that overflow to infinity (and NaN/Infinity unless allowed).

    `pairs` replaces the duplicate-key refusal: each object is handed over as its list of (key, value) pairs.
    Raises ValueError (JSONDecodeError or JSONRefused) with the reason.
    """
    _check_depth(text)
    try:
        data = json.loads(text, object_pairs_hook=pairs or _no_duplicates, parse_int=_int, parse_float=_float,
                          **({} if allow_nan else {"parse_constant": _no_constant}))
    except RecursionError:  # not reached after _check_depth; kept so that no path can end in a traceback
        raise JSONRefused(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    _check_strings(data)
    return data
