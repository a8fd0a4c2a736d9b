"""Low-rank algebra for ΔW = s·B·A without ever forming the d×k matrix.

The thin SVD comes from QR of the factors: B = Q_B R_B, Aᵀ = Q_A R_A, then the SVD of the r×r core
s·R_B·R_Aᵀ = U S Vᵀ gives ΔW = (Q_B U) S (Q_A V)ᵀ, in O((d + k)·r²) instead of a dense SVD's O(d·k·min(d, k)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


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
    qb, rb = torch.linalg.qr(b)  # d×r, r×r
    qa, ra = torch.linalg.qr(a.T)  # k×r, r×r
    uc, s, vch = torch.linalg.svd(scale * (rb @ ra.T), full_matrices=False)
    return ThinSVD(qb @ uc, s, qa @ vch.T)


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


def truncation_error(svd: ThinSVD, rank: int) -> float:
    """‖ΔW − ΔW_rank‖_F: the root of the discarded singular values' squares."""
    return float((svd.S[rank:].double() ** 2).sum().sqrt())


def top_svd(m: torch.Tensor, k: int, *, niter: int = 4, oversample: int = 16, seed: int = 0) -> ThinSVD:
    """The top-k singular triplets of a dense matrix by randomized subspace iteration (Halko, Martinsson & Tropp).

    Deterministic (a seeded sketch), O(d·n·(k + oversample)·niter); falls back to the full SVD when k is a large
    share of the matrix's rank. Used where no factors exist, e.g. ΔW = W_tuned − W_base.
    """
    d, n = m.shape
    q = min(k + oversample, d, n)
    if 2 * q >= min(d, n):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return ThinSVD(u[:, :k], s[:k], vh[:k].T)
    g = torch.Generator(device=m.device).manual_seed(seed)
    y, _ = torch.linalg.qr(m @ torch.randn(n, q, generator=g, dtype=m.dtype, device=m.device))
    for _ in range(niter):
        z, _ = torch.linalg.qr(m.T @ y)
        y, _ = torch.linalg.qr(m @ z)
    ub, s, vh = torch.linalg.svd(y.T @ m, full_matrices=False)
    return ThinSVD(y @ ub[:, :k], s[:k], vh[:k].T)


def top_svd_for_energy(m: torch.Tensor, share: float, max_rank: int | None = None) -> ThinSVD:
    """The fewest top singular triplets of a dense matrix whose squares reach `share` of ‖m‖_F² (capped at max_rank).

    ‖m‖_F² is exact; the sketch grows (16, 32, 64, …) until its singular values reach the share or the cap.
    """
    total = float(m.double().pow(2).sum())
    limit = min(m.shape) if max_rank is None else min(max_rank, *m.shape)
    k = min(16, limit)
    while True:
        svd = top_svd(m, k)
        energy = (svd.S.double() ** 2).cumsum(0)
        if total == 0.0 or energy[-1] >= share * total or k >= limit:
            need = int(torch.searchsorted(energy, torch.tensor(share * total, dtype=torch.float64)).item()) + 1 if total else 1
            keep = min(need, k)
            return ThinSVD(svd.U[:, :keep], svd.S[:keep], svd.V[:, :keep])
        k = min(2 * k, limit)
