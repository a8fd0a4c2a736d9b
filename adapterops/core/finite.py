"""The NaN/Inf check every command runs on what it reads and writes."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def finite_float(value: object) -> float | None:
    """`value` as a float when it is a real number (not a bool) that a float holds finite, else None. Never raises:
    the one conversion every scalar check builds on (a 400-digit integer overflows float(); NaN compares false)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return None
    return number if math.isfinite(number) else None


def all_finite(t: torch.Tensor) -> bool:
    """Whether a floating tensor has no NaN or Inf, in one pass without a mask the size of the tensor."""
    if not t.dtype.is_floating_point or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)  # NaN propagates into both
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def narrows(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting src to dst can overflow: a float dtype into one with a smaller range (float32 → float16/bf16)."""
    return src.is_floating_point and dst.is_floating_point and torch.finfo(dst).max < torch.finfo(src).max


def cast_loss(src: torch.Tensor, out: torch.Tensor) -> str | None:
    """Why `out` (src cast to a narrower dtype) lost finite values to ±Inf, or None when it did not.

    Costs one pass over `out` when the cast narrows; the mask is only built when something overflowed.
    """
    if not narrows(src.dtype, out.dtype) or all_finite(out):
        return None
    lost = torch.isfinite(src) & ~torch.isfinite(out)
    if not bool(lost.any()):
        return None  # the source already held NaN/Inf (passed through as it is)
    worst = src[lost].double().abs().max().item()
    sign = "-" if bool((src[lost] < 0).all()) else ""
    name = str(out.dtype).removeprefix("torch.")
    shown = f"{worst:g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")
    return f"{sign}{shown} does not fit in {name} (its largest value is {torch.finfo(out.dtype).max:g})"
