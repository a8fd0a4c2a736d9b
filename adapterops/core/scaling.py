"""LoRA scaling and PEFT's rank/alpha pattern matching (pure functions)."""

from __future__ import annotations

import functools
import math
import operator
import re

try:  # Python 3.11+ (sre_parse before, deprecated since)
    import re._parser as _sre_parser
except ImportError:  # pragma: no cover
    import sre_parse as _sre_parser  # type: ignore[no-redef]
from collections.abc import Callable, Iterable, Mapping


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's per-module scale: α/√r with rsLoRA, α/r otherwise (a Python double, as PEFT keeps it)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@functools.lru_cache(maxsize=4096)
def _compiled(key: str) -> re.Pattern[str]:
    return re.compile(rf"(.*\.)?({key})$")


def pattern_matches(key: str, module_name: str) -> bool:
    """Whether a rank/alpha pattern key matches a module name, by PEFT's rule `(.*\\.)?(KEY)$`.

    Keys must have passed `invalid_pattern` first: that is what bounds the time a match can take. For many keys
    against many modules use `pattern_index` (one regex compile per key at most, most keys none).
    """
    return _compiled(key).match(module_name) is not None


# PEFT 0.21 (`peft.utils.other.get_pattern_key`) looks a module up with re.match(rf"(.*\.)?({key})$", name), key by
# key in the config's order, the first match winning. A config may hold up to MAX_PATTERN_KEYS keys, far more than
# any regex cache, so matching every module against every key with `re` recompiles keys (modules × keys compiles:
# tens of minutes for 224 modules and 65,536 keys). `PatternIndex` gives the same answers from string operations:
#
# - a "plain" key (literal characters, `.` wildcards, escaped punctuation, an optional leading ^ and trailing $: what
#   PEFT users and adapterops' own `exact_key` write) matches a name iff the name, less one final newline, is
#   PREFIX + TAIL where TAIL has the key's length, equals the key at its literal positions, holds no newline at its
#   wildcard positions, and PREFIX is empty or (without ^) ends with "." and holds no newline. Keys are grouped by
#   (length, wildcard positions, ^); within a group a dict finds the keys whose literal characters the name's tail
#   has: per name, one slice and one dict look-up per group.
# - any other key is tried with its regex, compiled once per index, and only on names that end with the literal
#   text every match of it must end with (`_literal_tail`).


# a plain key: optional ^, then literal characters (no regex syntax, no newline), escaped punctuation and `.`, then
# an optional $
_PLAIN = re.compile(r"(\^?)((?:[^.^$*+?{}\[\]\\|()\n]|\\[!-/:-@\[-`{-~ ]|\.)+)\$?")
_PLAIN_TOKEN = re.compile(r"\\(.)|(\.)|([^\\.]+)", re.DOTALL)


def _plain_key(key: str) -> tuple[str, tuple[int, ...], bool] | None:
    """(text, wildcard positions, anchored at ^) for a plain key, None for any other (see above)."""
    m = _PLAIN.fullmatch(key)
    if m is None:
        return None
    body = m.group(2)
    if "\\" not in body:
        return body, tuple(i for i, c in enumerate(body) if c == "."), bool(m.group(1))
    text: list[str] = []
    wild: list[int] = []
    size = 0
    for escaped, dot, run in _PLAIN_TOKEN.findall(body):
        if dot:
            wild.append(size)
        piece = escaped or dot or run
        text.append(piece)
        size += len(piece)
    return "".join(text), tuple(wild), bool(m.group(1))


def _literal_tail(seq: list) -> tuple[str, bool]:
    """The literal text every match of this parse-tree sequence ends with, and whether the whole sequence is it."""
    out: list[str] = []
    for op, av in reversed(seq):
        name = str(op)
        if name == "LITERAL":
            out.append(chr(av))
            continue
        if name == "AT" and str(av) in ("AT_END", "AT_END_STRING") and not out:
            continue  # $ or \Z at the very end: the match ends where PEFT's own $ lets it
        if name == "SUBPATTERN" and not av[1] and not av[2]:
            inner, whole = _literal_tail(list(av[3]))
            out.extend(reversed(inner))
            if whole:
                continue
        return "".join(reversed(out)), False
    return "".join(reversed(out)), True


def _required_tail(key: str) -> str:
    """Text every module name that `key` matches ends with (before one final newline); "" when none can be told."""
    try:
        tree = _sre_parser.parse(key)
    except (re.error, RecursionError, OverflowError, ValueError):  # an invalid key: its regex compile reports it
        return ""
    if tree.state.flags & ~re.UNICODE:  # global flags (refused by invalid_pattern): case folding and the like
        return ""
    return _literal_tail(list(tree.data))[0]


class PatternIndex:
    """PEFT's pattern look-up over one ordered key list, built once: `first(name)` is `get_pattern_key`'s answer
    (None when no key matches), `matching(name)` every key that matches, in order. Same answers as
    `pattern_matches`, key by key. Each name's answer is computed once (names are module names: few)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        # (length, anchored) -> {wildcard positions: (literal characters getter, {literal characters: [key indices]})}
        self._plain: dict[tuple[int, bool], dict[tuple[int, ...], tuple[Callable[[str], object], dict[object, list[int]]]]] = {}
        self._other: list[tuple[int, str]] = []  # (key index, required tail) of keys that need their regex
        self._regex: dict[int, re.Pattern[str]] = {}
        self._memo: dict[str, tuple[int, ...]] = {}
        for i, key in enumerate(keys):
            plain = _plain_key(key)
            if plain is None:
                self._other.append((i, _required_tail(key)))
                continue
            text, wild, anchored = plain
            groups = self._plain.setdefault((len(text), anchored), {})
            group = groups.get(wild)
            if group is None:
                literal = sorted(set(range(len(text))).difference(wild))
                group = groups[wild] = (operator.itemgetter(*literal) if literal else _nothing, {})
            group[1].setdefault(group[0](text), []).append(i)

    def _hits(self, name: str) -> tuple[int, ...]:
        """Indices of the keys that match, in order."""
        hits = self._memo.get(name)
        if hits is not None:
            return hits
        stem = name.removesuffix("\n")
        newline = "\n" in stem
        found: list[int] = []
        for (length, anchored), groups in self._plain.items():
            cut = len(stem) - length
            if cut < 0 or (cut and (anchored or stem[cut - 1] != "." or (newline and "\n" in stem[:cut]))):
                continue
            tail = stem[cut:]
            if newline:  # a wildcard (`.`) does not match a newline
                lists = [table.get(get(tail)) for wild, (get, table) in groups.items() if all(tail[w] != "\n" for w in wild)]
            else:
                lists = [table.get(get(tail)) for get, table in groups.values()]
            for hit in lists:
                if hit:
                    found.extend(hit)
        for i, tail in self._other:
            if tail and not (name.endswith(tail) or (name.endswith("\n") and stem.endswith(tail))):
                continue
            regex = self._regex.get(i)
            if regex is None:
                regex = self._regex[i] = re.compile(rf"(.*\.)?({self.keys[i]})$")
            if regex.match(name) is not None:
                found.append(i)
        hits = self._memo[name] = tuple(sorted(found))
        return hits

    def first(self, name: str) -> str | None:
        """The first key, in order, that matches the module name (PEFT: first match wins), None when none does."""
        hits = self._hits(name)
        return self.keys[hits[0]] if hits else None

    def matching(self, name: str) -> list[str]:
        """Every key that matches the module name, in order."""
        return [self.keys[i] for i in self._hits(name)]


def _nothing(text: str) -> str:
    """The literal characters of a key that is all wildcards."""
    return ""


@functools.lru_cache(maxsize=16)
def _index(keys: tuple[str, ...]) -> PatternIndex:
    return PatternIndex(keys)


def pattern_index(keys: Iterable[str]) -> PatternIndex:
    """The `PatternIndex` of these keys in this order (cached: a config's patterns are indexed once per process)."""
    return _index(tuple(keys))


def first_matching_key(keys: Iterable[str], module_name: str) -> str | None:
    """The first pattern key, in the order given, that matches the module (PEFT: first match wins)."""
    return pattern_index(keys).first(module_name)


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
    if _plain_key(key) is not None:
        return None  # literals and `.` wildcards: compiles, no repeat (checked without compiling: 65,536 keys take 7 s)
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
