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
