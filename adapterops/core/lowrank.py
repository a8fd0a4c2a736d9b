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
