"""How much rank an update really uses: measures of a singular spectrum, and the LoRA paper's comparisons.

Pure functions over singular values and singular directions (from `lowrank.svd_of_product`, never a dense ΔW):
- stable rank ‖ΔW‖_F² / σ₁²;
- entropy effective rank exp(H(p)), pᵢ = σᵢ / Σσ (Roy & Vetterli 2007);
- energy ranks (`lowrank.energy_rank`);
- amplification ‖ΔW‖_F / ‖Uᵀ W V‖_F (Hu et al. 2021, §7.3), U, V the top-r singular directions of ΔW;
- normalized subspace similarity φ(i, j) = ‖U_iᵀ U'_j‖_F² / min(i, j) (Hu et al. 2021, §7.2).
"""

from __future__ import annotations

import math

import torch


def frobenius(s: torch.Tensor) -> float:
    """‖ΔW‖_F from its singular values."""
    return math.sqrt(float((s.double() ** 2).sum()))


def stable_rank(s: torch.Tensor) -> float:
    """‖ΔW‖_F² / σ₁² (0 for a zero update)."""
    top = float(s.double().max()) if s.numel() else 0.0
    return float((s.double() ** 2).sum()) / top**2 if top > 0 else 0.0


def entropy_rank(s: torch.Tensor) -> float:
    """exp of the Shannon entropy of σᵢ / Σσ (0 for a zero update; 1 for rank one; r for a flat spectrum)."""
    s = s.double()
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def amplification(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, fro: float) -> float:
    """‖ΔW‖_F / ‖Uᵀ W V‖_F: how strongly ΔW amplifies directions that W itself barely uses (inf when W ignores them)."""
    w = weight.to(u.dtype)
    projected = float(torch.linalg.norm((u.T @ w) @ v))
    return fro / projected if projected > 0 else math.inf


def similarity_grid(u1: torch.Tensor, u2: torch.Tensor, sizes1: list[int], sizes2: list[int]) -> list[list[float]]:
    """φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j) for every i in sizes1 and j in sizes2 (values in [0, 1])."""
    m = (u1.double().T @ u2.double()) ** 2
    cum = m.cumsum(0).cumsum(1)  # cum[i-1, j-1] = ‖U1_iᵀ U2_j‖_F²
    return [[float(cum[i - 1, j - 1]) / min(i, j) for j in sizes2] for i in sizes1]


def grid_sizes(r: int) -> list[int]:
    """1, 2, 4, … up to r, with r itself last: the i (or j) of a similarity grid."""
    sizes, k = [], 1
    while k < r:
        sizes.append(k)
        k *= 2
    return sizes + [r]


# Shuttleworth et al. 2024 ("LoRA vs Full Fine-tuning: An Illusion of Equivalence", arXiv 2410.21228): the top-k left
# singular vectors of the fine-tuned weight whose highest |cosine| with any singular vector of the base is below ε.
# k = 10 as in the authors' code (find_number_of_intruder_dimensions) and PEFT's intruders.py (top_k=10);
# ε = 0.5 as in PEFT's implementation of the paper (threshold_epsilon=0.5).
INTRUDER_K = 10
INTRUDER_EPSILON = 0.5


def intruder_cosines(base_u: torch.Tensor, tuned: torch.Tensor, k: int) -> list[float]:
    """For each of the top-k left singular vectors of `tuned` (W + ΔW), its highest |cosine| with any left singular
    vector of the base (`base_u`, the base's thin SVD U, orthonormal columns): below ε it is an intruder dimension."""
    u = torch.linalg.svd(tuned.to(base_u.dtype), full_matrices=False).U[:, :k]
    return [float(x) for x in (u.T @ base_u).abs().amax(dim=1).cpu()]
