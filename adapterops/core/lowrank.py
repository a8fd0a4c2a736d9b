"""Low-rank algebra for ΔW = s·B·A without ever forming the d×k matrix.

The thin SVD comes from QR of the factors: B = Q_B R_B, Aᵀ = Q_A R_A, then the SVD of the r×r core
s·R_B·R_Aᵀ = U S Vᵀ gives ΔW = (Q_B U) S (Q_A V)ᵀ, in O((d + k)·r²) instead of a dense SVD's O(d·k·min(d, k)).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from adapterops.core.finite import all_finite


class NotFinite(ValueError):
    """The matrix to decompose does not fit the working dtype: a scale or factors so large that s·B·A overflows
    (LAPACK would fail with a convergence error, or return NaN). The ops name the adapter and module."""


@dataclass
class ThinSVD:
    """ΔW = U · diag(S) · Vᵀ with U (d×r), S (r,) descending, V (k×r)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    def dense(self) -> torch.Tensor:
        """The d×k matrix (for tests and small cases only)."""
        return (self.U * self.S) @ self.V.T


def svd_of_product(lora_b: torch.Tensor, lora_a: torch.Tensor, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> ThinSVD:
    """Thin SVD of s·B·A through QR of B and Aᵀ (B: d×r, A: r×k); exact also when B·A is rank-deficient."""
    b = lora_b.reshape(lora_b.shape[0], -1).to(dtype)
    a = lora_a.reshape(lora_a.shape[0], -1).to(dtype)
    if not (all_finite(b) and all_finite(a)):
        raise NotFinite(f"its factors do not fit {_name(dtype)}")
    qb, rb = torch.linalg.qr(b)  # d×r, r×r
    qa, ra = torch.linalg.qr(a.T)  # k×r, r×r
    core = scale * (rb @ ra.T)  # r×r: the one place s·B·A can overflow once the factors are finite
    if not all_finite(core):
        raise NotFinite(f"s·B·A overflows {_name(dtype)}")
    uc, s, vch = torch.linalg.svd(core, full_matrices=False)
    return ThinSVD(qb @ uc, s, qa @ vch.T)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cat_factors(terms: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with B'·A' = Σ sᵢ·Bᵢ·Aᵢ exactly in exact arithmetic: B' = [B₁ … ], A' = [s₁A₁; …] (rank Σ rᵢ).

    Works on any factor shapes (conv kernels included): B's concatenate along dim 1, A's along dim 0.
    """
    return torch.cat([b for b, _, _ in terms], dim=1), torch.cat([a * s for _, a, s in terms], dim=0)


def svd_of_sum(terms: list[tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype = torch.float32) -> ThinSVD:
    """Thin SVD of Σ sᵢ·Bᵢ·Aᵢ, exactly, through the concatenated factors [s₁B₁ … ] · [A₁; …]."""
    b = torch.cat([bi.reshape(bi.shape[0], -1).to(dtype) * s for bi, _, s in terms], dim=1)
    a = torch.cat([ai.reshape(ai.shape[0], -1).to(dtype) for _, ai, _ in terms], dim=0)
    return svd_of_product(b, a, 1.0, dtype)


def energy_rank(s: torch.Tensor, share: float) -> int:
    """The fewest singular values whose squares reach `share` of Σσ² (at least 1 when any is non-zero)."""
    energy = (s.double() ** 2).cumsum(0)
    total = energy[-1].item() if energy.numel() else 0.0
    if total == 0.0:
        return 0
    return int(torch.searchsorted(energy, torch.tensor(share * total, dtype=torch.float64)).item()) + 1


def factors(svd: ThinSVD, rank: int, split: Literal["balanced", "b"] = "balanced") -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') of the best rank-`rank` approximation: √S on both sides ("balanced") or S in B' ("b", as PEFT)."""
    u, s, v = svd.U[:, :rank], svd.S[:rank], svd.V[:, :rank]
    if split == "balanced":
        root = s.sqrt()
        return u * root, (v * root).T.contiguous()
    return u * s, v.T.contiguous()


def pad_rank(b: torch.Tensor, a: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, width], A [width, in]): zero columns after B's and zero rows after A's; B·A is unchanged."""
    return (torch.cat([b, b.new_zeros(b.shape[0], width - b.shape[1])], dim=1),
            torch.cat([a, a.new_zeros(width - a.shape[0], a.shape[1])], dim=0))


def truncation_error(svd: ThinSVD, rank: int) -> float:
    """‖ΔW − ΔW_rank‖_F: the root of the discarded singular values' squares."""
    return float((svd.S[rank:].double() ** 2).sum().sqrt())


@contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Run the enclosed LAPACK calls on one CPU thread (then restore torch's setting).

    The QR or SVD of a matrix with a few dozen columns gains nothing from more threads and loses much to their
    hand-offs on a busy machine: a 5632×32 QR took 1 ms on one thread and 170 ms on two at load 5 on 2 cores.
    """
    previous = torch.get_num_threads()
    # torch's count is process-wide: only the main thread changes it, so that a reader thread's call cannot change it
    # under a merge whose bits depend on it (convolutions)
    if device.type != "cpu" or previous == 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def sum_squares(x: torch.Tensor, chunk: int = 1 << 16) -> float:
    """‖x‖_F² to ~1e-7 relative at memory speed: float32 dot products of 64K-element chunks, summed in float64.

    (torch.linalg.vector_norm of a float32 tensor is as fast but was 9e-4 off on 11.5M elements; a float64 copy
    is 40× slower.) inf or NaN when x holds them, or when a chunk's sum overflows float32.
    """
    flat = x.reshape(-1)
    if not flat.dtype.is_floating_point or flat.dtype == torch.float64:
        return float(flat.double().pow(2).sum())
    return math.fsum(float(torch.dot(c, c)) for c in flat.split(chunk))


def _orth(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (Q of the thin QR) of a tall-skinny matrix's columns."""
    with one_thread(x.device):
        return torch.linalg.qr(x)[0]


def top_svd(m: torch.Tensor, k: int, *, niter: int = 4, oversample: int = 16, seed: int = 0,
            tol: float | None = None) -> ThinSVD:
    """The top-k singular triplets of a dense matrix by randomized subspace iteration (Halko, Martinsson & Tropp).

    Deterministic (a seeded sketch), O(d·n·(k + oversample)·niter); falls back to the full SVD when k is a large
    share of the matrix's rank. Used where no factors exist, e.g. ΔW = W_tuned − W_base.

    With `tol`, the iteration stops early (at most `niter`) once the gap makes more pointless, (σ_q+1/σ_k)^(2i+1)
    ≤ tol after i iterations with an upper bound of σ_q+1 from the sketch's residual, or once an iteration adds
    less than `tol` times the remaining error ‖m‖_F² − Σ_{i≤k} s_i² to the captured energy Σ_{i≤k} s_i² (each
    estimate from the Gram matrix of the q = k + oversample sketch columns, in float64): with a clear gap after
    σ_k, as in the ΔW of a fine-tune, that is one iteration instead of four. The last product mᵀY is reused for the final small SVD
    (one large product fewer).
    """
    if not all_finite(m):
        raise NotFinite(f"it does not fit {_name(m.dtype)}")
    d, n = m.shape
    q = min(k + oversample, d, n)
    if 2 * q >= min(d, n):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return ThinSVD(u[:, :k], s[:k], vh[:k].T)
    g = torch.Generator(device=m.device).manual_seed(seed)
    y = _orth(m @ torch.randn(n, q, generator=g, dtype=m.dtype, device=m.device))
    if tol is None:
        for _ in range(niter):
            y = _orth(m @ _orth(m.T @ y))
        with one_thread(m.device):
            ub, s, vh = torch.linalg.svd(y.T @ m, full_matrices=False)
        return ThinSVD(y @ ub[:, :k], s[:k], vh[:k].T)
    total = sum_squares(m)
    captured = None
    for i in range(niter + 1):
        z = m.T @ y  # n×q: zᵀ = Yᵀm
        if i == niter:
            break
        zd = z.double()
        ev = torch.linalg.eigvalsh(zd.T @ zd)  # ascending: the sketch's s_i², i ≤ q
        now, s_k2 = float(ev[-k:].sum()), float(ev[-k])
        # σ_q+1² ≤ ‖m‖² − Σ_{i≤q} s_i² (the sketch's residual bounds the optimal rank-q one) and σ_k² ≥ s_k², so
        # gap ≥ the true σ_q+1²/σ_k²; after i iterations the tail leaks into the top k by (σ_q+1/σ_k)^(2i+1)
        gap = max(total - float(ev.sum()), 0.0) / s_k2 if s_k2 > 0 else 1.0
        if gap ** (i + 0.5) <= tol or (captured is not None and now - captured <= tol * max(total - now, 0.0)):
            break
        captured = now
        y = _orth(m @ _orth(z))
    with one_thread(m.device):
        vz, s, uzh = torch.linalg.svd(z, full_matrices=False)  # z = Vz·S·Uzᵀ, so Yᵀm = Uz·S·Vzᵀ
    return ThinSVD(y @ uzh[:k].T, s[:k], vz[:, :k])


def top_svd_for_energy(m: torch.Tensor, share: float, max_rank: int | None = None) -> ThinSVD:
    """The fewest top singular triplets of a dense matrix whose squares reach `share` of ‖m‖_F² (capped at max_rank).

    ‖m‖_F² is exact; the sketch grows (16, 32, 64, …) until its singular values reach the share or the cap.
    """
    total = float(m.double().pow(2).sum())
    limit = min(m.shape) if max_rank is None else min(max_rank, *m.shape)
    return grow_for_energy(lambda k: top_svd(m, k), share, total, limit)


def grow_for_energy(sketch: Callable[[int], ThinSVD], share: float, total: float, limit: int) -> ThinSVD:
    """The fewest top singular triplets whose squares reach `share` of `total` (= ‖m‖_F²), at most `limit`:
    `sketch(k)` gives the top k, and k grows (16, 32, 64, …) until their squares reach the share or the limit."""
    k = min(16, limit)
    while True:
        svd = sketch(k)
        energy = (svd.S.double() ** 2).cumsum(0)
        if total == 0.0 or energy[-1] >= share * total or k >= limit:
            need = int(torch.searchsorted(energy, torch.tensor(share * total, dtype=torch.float64)).item()) + 1 if total else 1
            keep = min(need, k)
            return ThinSVD(svd.U[:, :keep], svd.S[:keep], svd.V[:, :keep])
        k = min(2 * k, limit)
