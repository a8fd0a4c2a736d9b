"""Combining task tensors: task arithmetic, TIES, DARE, magnitude pruning, sign election (pure maths).

Two families live here:

- `peft_*`: PEFT 0.21.2's `utils/merge_utils.py` and the per-factor weighting of `add_weighted_adapter`,
  operation for operation (same tensor ops, same order, same layouts), so that on the same backend the bytes are
  identical. DARE draws its masks with `torch.bernoulli(full_like(t, density))`, one call per task tensor in
  order; passing a generator seeded like PEFT's global RNG reproduces PEFT's stream.
- `exact_*`: the same methods meant for one module's dense ΔWᵢ at a time, written for speed: the magnitude
  threshold comes from a sampled bracket plus an exact selection inside it (not a full top-k), and the masks are
  combined in place. The kept set is the same top-k as PEFT's except among entries of exactly equal magnitude
  (all of them are kept).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch

Majority = Literal["total", "frequency"]
PEFT_METHODS = ("linear", "svd", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
DENSITY_METHODS = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                   "magnitude_prune", "magnitude_prune_svd")
SIGN_METHODS = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
RANDOM_METHODS = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # PEFT: per-factor combination


def base_method(method: str) -> str:
    """The element-wise rule behind a method name: `ties_svd` -> `ties`, `svd` -> `linear`."""
    if method == "svd":
        return "linear"
    return method.removesuffix("_svd")


# ---------------------------------------------------------------- PEFT 0.21.2, operation for operation


def _reshape_weights(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def _magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_pruning(tensor: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None) -> torch.Tensor:
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density), generator=generator)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def _prune(tensor: torch.Tensor, density: float, method: str, rescale: bool = False,
           generator: torch.Generator | None = None) -> torch.Tensor:
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.", stacklevel=2)
        return tensor
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return _magnitude_based_pruning(tensor, density)
    return _random_pruning(tensor, density, rescale, generator)


def _majority_sign_mask(tensor: torch.Tensor, method: Majority = "total") -> torch.Tensor:
    sign = tensor.sign()
    sign_magnitude = tensor.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority_sign = torch.where(sign_magnitude >= 0, 1, -1)
    return sign == majority_sign


def _disjoint_merge(task_tensors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mixed = (task_tensors * mask).sum(dim=0)
    return mixed / torch.clamp(mask.sum(dim=0), min=1.0)


def peft_combine(method: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None = None,
                 majority: Majority = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """PEFT's `task_arithmetic` / `ties` / `dare_linear` / `dare_ties` / `magnitude_prune` (method = the base rule)."""
    if method == "linear":
        stacked = torch.stack(tensors, dim=0)
        return (stacked * _reshape_weights(stacked, weights)).sum(dim=0)
    if method in ("ties", "magnitude_prune"):
        pruned = [_prune(t, density, "magnitude") for t in tensors]
    else:
        pruned = [_prune(t, density, "random", rescale=True, generator=generator) for t in tensors]
    stacked = torch.stack(pruned, dim=0)
    if method in ("magnitude_prune", "dare_linear"):
        return (stacked * _reshape_weights(stacked, weights)).sum(dim=0)
    mask = _majority_sign_mask(stacked, majority)
    return _disjoint_merge(stacked * _reshape_weights(stacked, weights), mask)


def peft_factor_weights(weights: list[float], scales: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's per-factor weights: A gets σᵢ√|wᵢsᵢ|, B gets √|wᵢsᵢ| (float32, from Python doubles)."""
    wa, wb = [], []
    for w, s in zip(weights, scales):
        ws = w * s
        sign = 1 if ws >= 0 else -1
        wa.append(math.sqrt(abs(ws)) * sign)
        wb.append(math.sqrt(abs(ws)))
    return torch.tensor(wa), torch.tensor(wb)


def peft_factor_combine(method: str, a_list: list[torch.Tensor], b_list: list[torch.Tensor], weights: list[float],
                        scales: list[float], density: float | None, majority: Majority,
                        generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's non-SVD forms: the A factors combined, then the B factors (in that order: the RNG stream)."""
    wa, wb = peft_factor_weights(weights, scales)
    dtype = a_list[0].dtype
    a = peft_combine(method, a_list, wa, density, majority, generator).to(dtype)
    b = peft_combine(method, b_list, wb, density, majority, generator).to(dtype)
    return a, b


def peft_svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's truncation of a combined ΔW (already in lora_B @ lora_A layout): full SVD, S into B. Returns (A, B)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    u = u[:, :rank]
    s = s[:rank]
    u = u @ torch.diag(s)
    return vh[:rank, :], u


# ---------------------------------------------------------------- exact mode: one dense module at a time, fast


def magnitude_threshold(absx: torch.Tensor, k: int) -> float:
    """The k-th largest value of a flat non-negative tensor, exactly, without sorting it all.

    A strided sample brackets the k-th value; the entries inside the bracket (a small share) are selected exactly.
    Falls back to `kthvalue` when the bracket misses.
    """
    n = absx.numel()
    if k <= 0:
        return math.inf
    if k >= n:
        return float(absx.min())
    if n <= 1 << 18:
        return float(torch.kthvalue(absx, n - k + 1).values)
    step = max(1, n // 65536)
    sample = absx[::step]
    q = 1.0 - k / n
    margin = 4.0 * math.sqrt(q * (1 - q) / sample.numel()) + 2.0 / sample.numel()
    lo = float(torch.quantile(sample, max(0.0, q - margin))) if q - margin > 0 else 0.0
    hi = float(torch.quantile(sample, min(1.0, q + margin))) if q + margin < 1 else math.inf
    above = int((absx > hi).sum()) if hi != math.inf else 0
    inside = absx[(absx >= lo) & (absx <= hi)]
    need = k - above  # the need-th largest inside the bracket
    if 1 <= need <= inside.numel():
        return float(torch.kthvalue(inside, inside.numel() - need + 1).values)
    return float(torch.kthvalue(absx, n - k + 1).values)


def exact_magnitude_prune_(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top `int(density·numel)` magnitudes of t (in place; equal magnitudes at the cut are all kept)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    absx = t.abs()
    thr = magnitude_threshold(absx.reshape(-1), k)
    return t.masked_fill_(absx < thr, 0.0)


def exact_random_prune_(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability density and rescale by 1/density (in place).

    The mask is `torch.bernoulli(full_like(t, density))`, as PEFT draws it for its `dare_*_svd` forms, so the same
    seed and module order give PEFT's masks.
    """
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t.mul_(mask).div_(density)


def exact_combine(method: str, deltas: list[torch.Tensor], weights: list[float], density: float | None = None,
                  majority: Majority = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """The method applied to dense ΔWᵢ (consumed: modified in place). method is the base rule (see base_method)."""
    if method == "linear":
        out = deltas[0].mul_(weights[0])
        for d, w in zip(deltas[1:], weights[1:]):
            out.add_(d, alpha=w)
        return out
    if method in ("ties", "magnitude_prune"):
        pruned = [exact_magnitude_prune_(d, density) for d in deltas]
    else:
        pruned = [exact_random_prune_(d, density, generator) for d in deltas]
    if method in ("magnitude_prune", "dare_linear"):
        return exact_combine("linear", pruned, weights)
    # sign election on the unweighted pruned tensors (as TIES and PEFT), then the mean of the agreeing weighted ones
    if majority == "total":
        elected = sum(pruned[1:], pruned[0].clone())
    else:
        elected = sum((p.sign() for p in pruned[1:]), pruned[0].sign())
    sign = torch.where(elected >= 0, 1.0, -1.0)
    del elected
    total = torch.zeros_like(pruned[0])
    count = torch.zeros_like(pruned[0])
    for p, w in zip(pruned, weights):
        agree = (p * sign) > 0  # p has the elected sign (zeros never agree)
        count.add_(agree)
        total.add_(p.mul_(agree), alpha=w)
    return total.div_(count.clamp_(min=1.0))


def sign_conflict(d1: torch.Tensor, d2: torch.Tensor) -> tuple[float | None, int]:
    """The share of entries where two ΔW disagree in sign, among entries where both are non-zero (and that count)."""
    s1, s2 = d1.sign(), d2.sign()
    both = (s1 != 0) & (s2 != 0)
    n = int(both.sum())
    if n == 0:
        return None, 0
    return int(((s1 * s2) < 0).sum()) / n, n
