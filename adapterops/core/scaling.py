"""LoRA scaling and PEFT's rank/alpha pattern matching (pure functions)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's per-module scale: α/√r with rsLoRA, α/r otherwise (a Python double, as PEFT keeps it)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def pattern_matches(key: str, module_name: str) -> bool:
    """Whether a rank/alpha pattern key matches a module name, by PEFT's rule `(.*\\.)?(KEY)$`."""
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


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


def invalid_pattern(key: str) -> str | None:
    """The regex error of a pattern key, or None when it compiles."""
    try:
        re.compile(rf"(.*\.)?({key})$")
    except re.error as exc:
        return str(exc)
    return None


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
