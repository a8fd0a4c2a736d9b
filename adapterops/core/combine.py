"""Combining task tensors: task arithmetic, TIES, DARE, magnitude pruning, sign election (pure maths).

Two families live here:

- `peft_*`: PEFT 0.21.2's `utils/merge_utils.py` and the per-factor weighting of `add_weighted_adapter`,
  operation for operation (same tensor ops, same order, same layouts), so that on the same backend the bytes are
  identical. DARE draws its masks with `torch.bernoulli(full_like(t, density))`, one call per task tensor in
  order; passing a generator seeded like PEFT's global RNG reproduces PEFT's stream.
- `exact_*`: the same methods meant for one module's dense ΔWᵢ at a time, written for speed: the magnitude
  threshold comes from a sampled bracket plus an exact selection inside it (not a full top-k), and the masks are
  combined in place. The kept set is PEFT's top-k: exactly k entries; where entries tie with the cut-off
  magnitude, the choice among them is `torch.topk`'s, as in PEFT. `exact_combine_factors` does the same from
  the factors, one block of rows at a time (each ΔWᵢ block recomputed in cache), and `sketch_svd` truncates the
  result starting from the inputs' row spaces.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch

from adapterops.core.lowrank import ThinSVD, grow_for_energy
from adapterops.core.parallel import map_indexed
from adapterops.core.torch_rng import bernoulli_masks

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


def _sample_index(n: int, size: int = 65536) -> torch.Tensor:
    """Seeded uniform positions for the bracketing sample (a stride would see only a few columns of a matrix
    whose width shares factors with it, biasing the bracket)."""
    return torch.randint(0, n, (size,), generator=torch.Generator().manual_seed(0))


def magnitude_cut(absx: torch.Tensor, k: int) -> tuple[float, int, int]:
    """(τ, n_gt, n_eq) of a flat non-negative tensor: τ its k-th largest value, exactly, without sorting it all;
    n_gt the entries > τ and n_eq those = τ (n_gt + n_eq > k: entries tie with τ at the cut).

    A random sample brackets the k-th value; the entries inside the bracket (a small share) are selected exactly.
    Falls back to `kthvalue` when the bracket misses.
    """
    n = absx.numel()
    if k <= 0:
        return math.inf, 0, 0
    if n > 1 << 18 and k < n:
        sample = absx[_sample_index(n)]
        q = 1.0 - k / n
        margin = 4.0 * math.sqrt(q * (1 - q) / sample.numel()) + 2.0 / sample.numel()
        lo = float(torch.quantile(sample, max(0.0, q - margin))) if q - margin > 0 else 0.0
        hi = float(torch.quantile(sample, min(1.0, q + margin))) if q + margin < 1 else math.inf
        above = int((absx > hi).sum()) if hi != math.inf else 0
        inside = absx[(absx >= lo) & (absx <= hi)]
        need = k - above  # the need-th largest inside the bracket
        if 1 <= need <= inside.numel():
            thr = float(torch.kthvalue(inside, inside.numel() - need + 1).values)
            return thr, above + int((inside > thr).sum()), int((inside == thr).sum())
    thr = float(torch.kthvalue(absx, n - min(k, n) + 1).values)
    return thr, int((absx > thr).sum()), int((absx == thr).sum())


def magnitude_threshold(absx: torch.Tensor, k: int) -> float:
    """The k-th largest value of a flat non-negative tensor, exactly, without sorting it all."""
    return magnitude_cut(absx, k)[0]


def _keep_ties(absx: torch.Tensor, thr: float, budget: int) -> tuple[torch.Tensor, int]:
    """The kept mask of a block of |x| for cut-off thr: every entry > thr, and the first `budget` entries = thr in
    row-major order. Returns (mask, the budget left)."""
    eq = absx == thr
    n_eq = int(eq.sum())
    if n_eq <= budget:
        return absx >= thr, budget - n_eq
    keep = absx > thr
    flat = keep.view(-1)
    flat[eq.view(-1).nonzero()[:budget, 0]] = True
    return keep, 0


def exact_magnitude_prune_(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top `int(density·numel)` magnitudes of t, in place: exactly k entries, as PEFT's magnitude prune
    (among entries tied at the cut, the first in row-major order; PEFT's is `torch.topk`'s unspecified choice)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    absx = t.abs()
    thr, n_gt, n_eq = magnitude_cut(absx.reshape(-1), k)
    if n_gt + n_eq > k:
        return t.masked_fill_(~_keep_ties(absx.contiguous(), thr, k - n_gt)[0], 0.0)
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


@contextmanager
def one_thread() -> Iterator[None]:
    """Run small LAPACK calls (QR of a tall, thin panel; SVD of a q×n sketch) on one thread.

    Threaded LAPACK on such panels synchronises the threads once per column: on a loaded machine every barrier
    waits for a descheduled thread, and a 3 ms QR took 100–400 ms (measured on 2 shared cores). One thread is
    as fast when idle and never waits.
    """
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _orth(y: torch.Tensor) -> torch.Tensor:
    with one_thread():
        return torch.linalg.qr(y)[0]


DENSE_SIDE = 256  # a matrix this short on one side gets the dense SVD (see sketch_svd)


def sketch_svd(m: torch.Tensor, k: int, start: torch.Tensor, niter: int = 2) -> ThinSVD:
    """The top-k singular triplets of a dense m (d×n) by subspace iteration from `start` (n×q, q ≥ k).

    For a TIES/DARE/pruned combination of adapters, `start` = the inputs' stacked lora_A rows (transposed): the
    combination's dominant row space lies close to theirs, so two power steps reach the optimal (Eckart–Young)
    truncation error to ~1e-10 relative, where a Gaussian start of 64 columns needed 3 steps for the same with
    two adapters, and failed to by 1e-3 with four. Cost: (2 + 2·niter) products of m with q columns.

    A matrix with a side of at most DENSE_SIDE (k_proj/v_proj under grouped-query attention: 256×2048) gets the
    dense SVD instead, exact: its flat DARE spectrum left two steps 3e-7 (two adapters) to 2.5e-6 (four) above
    the optimum, and the dense SVD of its tall orientation costs ~15 ms here.
    """
    d, n = m.shape
    q = start.shape[1]
    if 2 * q >= min(d, n) or min(d, n) <= DENSE_SIDE:
        if d < n:  # LAPACK is ~2x faster on the tall orientation (2048×256: 15 ms, 256×2048: 33 ms)
            v, s, uh = torch.linalg.svd(m.T, full_matrices=False)
            return ThinSVD(uh[:k].T, s[:k], v[:, :k])
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return ThinSVD(u[:, :k], s[:k], vh[:k].T)
    y = _orth(m @ start.to(m.dtype))
    for _ in range(niter):
        y = _orth(m @ _orth(m.T @ y))
    with one_thread():
        ub, s, vh = torch.linalg.svd(y.T @ m, full_matrices=False)
    return ThinSVD(y @ ub[:, :k], s[:k], vh[:k].T)


def sketch_start(a_rows: list[torch.Tensor], k: int, extra: int = 16, seed: int = 0) -> torch.Tensor:
    """The start of `sketch_svd` for rank k: the inputs' lora_A rows (n×Σrᵢ), and Gaussian columns up to k + extra
    where Σrᵢ is smaller; above 4·(k + extra) columns, random combinations of them (k + extra + 32)."""
    a = torch.cat([x.reshape(x.shape[0], -1).float() for x in a_rows], dim=0).T
    g = torch.Generator().manual_seed(seed)
    want = k + extra
    if a.shape[1] > 4 * want:
        return a @ torch.randn(a.shape[1], want + 32, generator=g)
    a = a / a.norm(dim=0).clamp(min=1e-30)  # rows of very different scales: equal footing in the QR
    if a.shape[1] < want:
        a = torch.cat([a, torch.randn(a.shape[0], want - a.shape[1], generator=g) / math.sqrt(a.shape[0])], dim=1)
    return a


def sketch_svd_for_energy(m: torch.Tensor, share: float, a_rows: list[torch.Tensor], max_rank: int | None,
                          total: float, niter: int = 2) -> ThinSVD:
    """The fewest top singular triplets of m whose squares reach `share` of `total` (= ‖m‖_F²), capped at
    max_rank: the sketch grows (16, 32, 64, …) until its singular values reach the share or the cap."""
    limit = min(m.shape) if max_rank is None else min(max_rank, *m.shape)
    return grow_for_energy(lambda k: sketch_svd(m, k, sketch_start(a_rows, k), niter), share, total, limit)


def sketch_steps(method: str) -> int:
    """Power steps of sketch_svd for a method's combined matrix: DARE's random masks flatten its spectrum (two
    steps left a 5632×2048 module 1e-9 to 1e-8 above the Eckart–Young error, three 1e-11 to 2e-10), so 3; else 2."""
    return 3 if method in RANDOM_METHODS or method.startswith("dare") else 2


def dare_masks(shape: tuple[int, int], count: int, density: float, generator: torch.Generator | None) -> list[torch.Tensor]:
    """DARE's keep masks for `count` task tensors of `shape`, drawn as `torch.bernoulli(full_like(t, density))`
    draws them (one value per entry, tensor after tensor): PEFT's stream for the same generator state. The draws
    come from NumPy's MT19937 at the generator's state (core/torch_rng.py): the same masks, 3x faster."""
    return bernoulli_masks(shape, count, density, generator)


def exact_combine_factors(method: str, terms: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float],
                          density: float | None = None, majority: Majority = "total",
                          generator: torch.Generator | None = None, block: int = 1 << 17, workers: int = 1,
                          masks: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
    """`exact_combine` of ΔWᵢ = Bᵢ·Aᵢ (terms: (Bᵢ with its scale folded in, d×rᵢ; Aᵢ, rᵢ×n)), never holding
    more than one ΔWᵢ and the result: returns (the combined d×n matrix, its ‖·‖_F²).

    Magnitude pruning forms each ΔWᵢ once for its threshold; DARE draws each ΔWᵢ's mask (one bernoulli call per
    term, in order: PEFT's stream). Then, one block of rows at a time, every ΔWᵢ block is recomputed (a rank-rᵢ
    product, in cache), pruned, and the block combined: the same values as `exact_combine` on the dense ΔWᵢ.

    DARE's masks may be given (`masks`, from `dare_masks`, e.g. drawn ahead in another thread) instead of drawn here.
    `workers` threads take blocks of rows in turn (each block is independent, so the values do not depend on it;
    torch runs one thread inside each). Entries tied at a magnitude cut-off are kept first in row-major order, so a
    term with such ties (rare: exact equal magnitudes) is combined on one thread.
    """
    d, n = terms[0][0].shape[0], terms[0][1].shape[1]
    numel = d * n
    # per term: ("thr", τ) | ("ties", [τ, how many entries = τ still to keep]) | ("mask", bool d×n) | ("all", None)
    keeps: list[tuple[str, object]] = []
    if method in ("ties", "magnitude_prune"):
        if density >= 1:
            keeps = [("all", None)] * len(terms)
        else:
            kk = int(density * numel)
            for b, a in terms:
                thr, n_gt, n_eq = _factor_cut(b, a, kk, block, workers)
                keeps.append(("ties", [thr, kk - n_gt]) if n_gt + n_eq > kk else ("thr", thr))
    elif method in ("dare_linear", "dare_ties"):
        if density >= 1:
            keeps = [("all", None)] * len(terms)
        else:
            drawn = masks if masks is not None else dare_masks((d, n), len(terms), density, generator)
            keeps = [("mask", m) for m in drawn]
    else:
        keeps = [("all", None)] * len(terms)
    rescale = method in ("dare_linear", "dare_ties") and density < 1
    signed = method in ("ties", "dare_ties")
    out = torch.empty(d, n)
    rows = max(1, block // max(n, 1))
    starts = range(0, d, rows)
    sequential = any(kind == "ties" for kind, _ in keeps)  # the tie budget is spent in row-major order

    def one(r0: int) -> float:
        return _combine_block(out[r0:min(d, r0 + rows)], r0, terms, keeps, weights, density, rescale, signed, majority)

    with one_thread():  # small in-cache blocks: torch's threads would meet at a barrier after every op
        norm_sq = math.fsum(_map_blocks(one, starts, 1 if sequential else workers))
    return out, norm_sq


def _map_blocks(fn, starts, workers: int) -> list:
    """fn over the block starts, in order, on `workers` threads (independent blocks; torch releases the GIL)."""
    starts = list(starts)
    return map_indexed(lambda i: fn(starts[i]), len(starts), workers)


def _below(thr: float) -> float:
    """The largest float32 below thr (thr > 0): |x| ≤ it ⟺ |x| < thr for float32 x."""
    return float(np.nextafter(np.float32(thr), np.float32(0)))


def _factor_cut(b: torch.Tensor, a: torch.Tensor, k: int, block: int, workers: int = 1) -> tuple[float, int, int]:
    """`magnitude_cut` of |B·A| without forming it: a random sample of its entries (from the factors) brackets
    the k-th largest, then one pass over blocks of rows (recomputed in cache) counts the entries above the
    bracket and gathers those inside it. Falls back to the dense `magnitude_cut` when the bracket misses."""
    d, n = b.shape[0], a.shape[1]
    numel = d * n
    if numel <= 1 << 18 or k >= numel:
        return magnitude_cut((b @ a).abs_().reshape(-1), k)
    idx = _sample_index(numel)
    sample = (b[idx // n] * a[:, idx % n].T).sum(dim=1).abs_().sort().values
    q = 1.0 - k / numel
    margin = 4.0 * math.sqrt(q * (1 - q) / sample.numel()) + 2.0 / sample.numel()
    lo = float(sample[max(0, int((q - margin) * sample.numel()) - 1)]) if q - margin > 0 else 0.0
    hi = float(sample[min(sample.numel() - 1, int((q + margin) * sample.numel()) + 1)]) if q + margin < 1 else math.inf
    rows = max(1, block // n)
    lo32, hi32 = np.float32(lo), np.float32(hi)  # exact: lo and hi are float32 values of the sample

    def one(r0: int) -> tuple[int, np.ndarray]:
        # the comparisons and the selection in NumPy: 4-6x faster than torch's bool kernels here, same values
        x = (b[r0:r0 + rows] @ a).abs_().numpy()
        return int(np.count_nonzero(x > hi32)), x[(x >= lo32) & (x <= hi32)]

    with one_thread():
        parts = _map_blocks(one, range(0, d, rows), workers)
    above = sum(p[0] for p in parts)
    inside = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    need = k - above
    if 1 <= need <= inside.numel():
        thr = float(torch.kthvalue(inside, inside.numel() - need + 1).values)
        return thr, above + int((inside > thr).sum()), int((inside == thr).sum())
    return magnitude_cut((b @ a).abs_().reshape(-1), k)


def _combine_block(o, r0, terms, keeps, weights, density, rescale, signed, majority) -> float:
    """One block of rows of exact_combine_factors, written into o; returns its ‖·‖_F²."""
    r1 = r0 + o.shape[0]
    ps = []
    for (b, a), (kind, keep) in zip(terms, keeps):
        x = b[r0:r1] @ a
        if kind == "thr":  # |x| < τ → 0 in one pass (hardshrink zeroes |x| ≤ λ, λ the float32 just below τ)
            if keep > 0:
                x = torch.nn.functional.hardshrink(x, _below(keep)) if math.isfinite(keep) else x.zero_()
        elif kind == "ties":
            mask, keep[1] = _keep_ties(x.abs(), keep[0], keep[1])
            x.masked_fill_(~mask, 0.0)
        elif kind == "mask":
            x.masked_fill_(~keep[r0:r1], 0.0)
        if rescale:
            x.div_(density)
        ps.append(x)
    if not signed:
        o.copy_(ps[0]).mul_(weights[0])
        for x, w in zip(ps[1:], weights[1:]):
            o.add_(x, alpha=w)
    else:
        # sign election on the unweighted pruned blocks, then the mean of the agreeing weighted ones:
        # Σ wᵢ·pᵢ·[pᵢσ > 0] = σ·Σ wᵢ·max(pᵢσ, 0) (σ = ±1, so the products are exact)
        if majority == "total":
            el = ps[0].clone()
            for x in ps[1:]:
                el.add_(x)
        else:
            el = ps[0].sign()
            for x in ps[1:]:
                el.add_(x.sign())
        # the comparisons in NumPy (4-6x faster than torch's bool kernels here), the arithmetic in torch as before
        sgn_np = (el.numpy() >= 0).astype(np.float32)  # 1 where el ≥ 0 (−0 included), else 0 ...
        sgn_np *= 2
        sgn_np -= 1  # ... then ±1 (np.where with scalars was 13x slower)
        sgn = torch.from_numpy(sgn_np)
        count = np.zeros(sgn.shape, dtype=np.float32)
        o.zero_()
        for x, w in zip(ps, weights):
            count += x.mul_(sgn).numpy() > 0
            o.add_(x.clamp_(min=0.0), alpha=w)
        o.mul_(sgn).div_(torch.from_numpy(count).clamp_(min=1.0))
    flat = o.reshape(-1)
    return float(torch.dot(flat, flat))


def sign_conflict(d1: torch.Tensor, d2: torch.Tensor) -> tuple[float | None, int]:
    """The share of entries where two ΔW disagree in sign, among entries where both are non-zero (and that count)."""
    s1, s2 = d1.sign(), d2.sign()
    both = (s1 != 0) & (s2 != 0)
    n = int(both.sum())
    if n == 0:
        return None, 0
    return int(((s1 * s2) < 0).sum()) / n, n
