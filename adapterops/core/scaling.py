"""LoRA scaling and PEFT's rank/alpha pattern matching (pure functions)."""

from __future__ import annotations

import functools
import math
import re

try:  # Python 3.11+ (sre_parse before, deprecated since)
    import re._parser as _sre_parser
except ImportError:  # pragma: no cover
    import sre_parse as _sre_parser  # type: ignore[no-redef]
from collections.abc import Iterable, Mapping


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's per-module scale: α/√r with rsLoRA, α/r otherwise (a Python double, as PEFT keeps it)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@functools.lru_cache(maxsize=4096)
def _compiled(key: str) -> re.Pattern[str]:
    return re.compile(rf"(.*\.)?({key})$")


def pattern_matches(key: str, module_name: str) -> bool:
    """Whether a rank/alpha pattern key matches a module name, by PEFT's rule `(.*\\.)?(KEY)$`.

    Keys must have passed `invalid_pattern` first: that is what bounds the time a match can take.
    """
    return _compiled(key).match(module_name) is not None


def first_matching_key(keys: Iterable[str], module_name: str) -> str | None:
    """The first pattern key, in the order given, that matches the module (PEFT: first match wins)."""
    for key in keys:
        if pattern_matches(key, module_name):
            return key
    return None


def resolve_rank_alpha(
    module_name: str,
    r: int,
    alpha: float,
    rank_pattern: Mapping[str, int],
    alpha_pattern: Mapping[str, float],
) -> tuple[int, float]:
    """The rank and alpha PEFT gives a module: patterns looked up independently, first match in file order."""
    rk = first_matching_key(rank_pattern, module_name)
    ak = first_matching_key(alpha_pattern, module_name)
    return (rank_pattern[rk] if rk is not None else r), (alpha_pattern[ak] if ak is not None else alpha)


# Python's backtracking matcher can take exponential time on some patterns ("ReDoS"), and a hostile adapter
# config chooses the pattern. A key must therefore have a shape whose matching time is bounded (checked on the
# parse tree, before any match): no repeat inside a repeat ((a+)+, (.*)*, (\w+\.?)+), no alternation inside a
# repeat unless each branch begins with its own literal character ((a|a)*, (a|aa)+ are ambiguous; (q|v)* is
# not), no backreferences, and at most MAX_PATTERN_REPEATS repeats in all (.*.*.*.*Z is polynomial of that degree).
# Module names are at most MAX_MODULE_NAME characters (io/adapter.py), so the worst match stays well under 1 s.
MAX_PATTERN_KEYS = 65536
MAX_PATTERN_KEY_CHARS = 1024
MAX_PATTERN_REPEATS = 3
MAX_MODULE_NAME = 256

_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}
_BACKREFS = {"GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE", "GROUPREF_LOC_IGNORE", "GROUPREF_UNI_IGNORE"}


def _children(op: str, av: object) -> list[list]:
    """The sub-sequences of one parse-tree node."""
    if op in _REPEATS:
        return [av[2]]
    if op == "SUBPATTERN":
        return [av[3]]
    if op == "ATOMIC_GROUP":
        return [av]
    if op in ("ASSERT", "ASSERT_NOT"):
        return [av[1]]
    if op == "BRANCH":
        return list(av[1])
    return []


def _first_literal(seq: list) -> int | None:
    """The character code a sequence must begin with, when it begins with a literal (through groups)."""
    while seq:
        op, av = seq[0]
        name = str(op)
        if name == "LITERAL":
            return av
        if name == "SUBPATTERN":
            seq = av[3]
            continue
        return None
    return None


def _unsafe(seq: list, in_repeat: bool, count: list[int]) -> str | None:
    """Why this parse-tree sequence can make the matcher backtrack without bound, or None."""
    for op, av in seq:
        name = str(op)
        if name in _BACKREFS:
            return "backreferences are not supported in pattern keys"
        if name in _REPEATS:
            hi = av[1]
            if hi is None or hi > 1 or str(hi) == "MAXREPEAT":
                if in_repeat:
                    return "a repeat inside a repeat (nested quantifiers, as in (a+)+) can take exponential time"
                count[0] += 1
                if count[0] > MAX_PATTERN_REPEATS:
                    return f"more than {MAX_PATTERN_REPEATS} repeats (*, +, {{m,n}}) can take polynomial time of that degree"
                why = _unsafe(av[2], True, count)
            elif in_repeat:
                return "an optional part inside a repeat (as in (ab?)*) is ambiguous and can take exponential time"
            else:
                why = _unsafe(av[2], in_repeat, count)
            if why:
                return why
            continue
        if name == "BRANCH" and in_repeat:
            firsts = [_first_literal(alt) for alt in av[1]]
            keys = [chr(f).lower() if f is not None else None for f in firsts]
            if None in keys or len(set(keys)) != len(keys):
                return ("an alternation inside a repeat whose branches can match the same text (as in (a|a)* or "
                        "(a|aa)+) can take exponential time")
        for child in _children(name, av):
            why = _unsafe(child, in_repeat, count)
            if why:
                return why
    return None


def invalid_pattern(key: object) -> str | None:
    r"""Why a rank/alpha pattern key cannot be used (not a string, too long, not a regex, unbounded matching time).

    None when the key is a valid pattern whose matching time is bounded. Every pattern PEFT users write passes
    (q_proj, .*\.q_proj, model.layers.0.self_attn.q_proj, layers\.(0|1)\., ^.*(q|v)_proj$, ...).
    """
    if not isinstance(key, str):
        return f"a pattern key must be a string, not {type(key).__name__}"
    if len(key) > MAX_PATTERN_KEY_CHARS:
        return f"the key is {len(key)} characters long, over the limit of {MAX_PATTERN_KEY_CHARS}"
    if not key:
        return "the key is empty"
    try:
        re.compile(rf"(.*\.)?({key})$")
        tree = _sre_parser.parse(key)
    except re.error as exc:
        return f"not a valid regular expression ({exc})"
    except (RecursionError, OverflowError, ValueError) as exc:
        return f"not a usable regular expression ({type(exc).__name__})"
    why = _unsafe(list(tree.data), False, [0])
    return f"refused: {why}" if why else None


def alpha_for(scale: float, r: int, use_rslora: bool) -> float:
    """The alpha whose PEFT scale (α/r, or α/√r under rsLoRA) is this scale, or the nearest one reachable.

    s·r (s·√r) can miss by an ulp after PEFT's division, so the neighbouring floats are tried too. Some scales
    are not reachable at all (the division skips them); then the result is within one ulp.
    """
    start = scale * math.sqrt(r) if use_rslora else scale * r
    best, best_err = start, abs(lora_scale(r, start, use_rslora) - scale)
    for direction in (math.inf, -math.inf):
        a = start
        for _ in range(3):
            if best_err == 0.0:
                return best
            a = math.nextafter(a, direction)
            err = abs(lora_scale(r, a, use_rslora) - scale)
            if err < best_err:
                best, best_err = a, err
    return best
