"""The NaN/Inf check every command runs on what it reads and writes."""

from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """Whether a floating tensor has no NaN or Inf, in one pass without a mask the size of the tensor."""
    if not t.dtype.is_floating_point or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)  # NaN propagates into both
    return bool(torch.isfinite(lo) and torch.isfinite(hi))
