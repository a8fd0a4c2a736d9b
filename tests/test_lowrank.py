"""The low-rank core against numpy's dense SVD, on random and rank-deficient factors.

Tolerances: float64 runs agree with the dense SVD to 1e-9 relative; float32 to 1e-4 relative (an SVD's singular
values carry about ‖ΔW‖·eps·√r error, and the QR route adds one more such step).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterops.core import lowrank
from adapterops.core.lowrank import (
    energy_rank,
    factors,
    svd_of_product,
    svd_of_sum,
    truncation_error,
)


def random_factors(seed: int, d: int, k: int, r: int, true_rank: int | None = None):
    """B (d×r), A (r×k); with true_rank < r, B·A has exactly that rank."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(d, r, generator=g, dtype=torch.float64)
    a = torch.randn(r, k, generator=g, dtype=torch.float64)
    if true_rank is not None:
        b[:, true_rank:] = b[:, :true_rank] @ torch.randn(true_rank, r - true_rank, generator=g, dtype=torch.float64)
    return b, a


@given(seed=st.integers(0, 10**6), d=st.integers(1, 40), k=st.integers(1, 40), r=st.integers(1, 12), deficient=st.booleans())
@settings(max_examples=60, deadline=None)
def test_qr_svd_equals_dense_svd(seed, d, k, r, deficient):
    true_rank = max(1, r // 2) if deficient and r > 1 else None
    b, a = random_factors(seed, d, k, r, true_rank)
    svd = svd_of_product(b, a, 0.7, dtype=torch.float64)
    dense = 0.7 * (b @ a).numpy()
    want = np.linalg.svd(dense, compute_uv=False)
    n = min(len(want), svd.S.numel())
    scale = max(want[0], 1e-30)
    assert np.allclose(svd.S[:n].numpy(), want[:n], atol=1e-9 * scale)
    assert np.allclose(svd.dense().numpy(), dense, atol=1e-9 * scale)
    assert bool((svd.S[1:] <= svd.S[:-1] + 1e-12).all())


def test_float32_against_dense():
    b, a = random_factors(1, 500, 300, 16)
    svd = svd_of_product(b.float(), a.float(), 2.0)
    want = np.linalg.svd(2.0 * (b @ a).numpy(), compute_uv=False)[:16]
    assert np.allclose(svd.S.double().numpy(), want, rtol=1e-4)


def test_sum_is_exact_and_truncation_error_is_the_discarded_values():
    b1, a1 = random_factors(2, 60, 50, 4)
    b2, a2 = random_factors(3, 60, 50, 6)
    svd = svd_of_sum([(b1, a1, 1.5), (b2, a2, -0.5)], dtype=torch.float64)
    want = 1.5 * b1 @ a1 - 0.5 * b2 @ a2
    assert torch.allclose(svd.dense(), want, atol=1e-10)
    for rank in (1, 3, 10):
        for split in ("balanced", "b"):
            bb, aa = factors(svd, rank, split)
            err = torch.linalg.norm(want - bb @ aa).item()
            assert abs(err - truncation_error(svd, rank)) <= 1e-9 * max(err, 1.0)


@pytest.mark.parametrize("share,expected", [(0.5, 1), (0.8, 2), (0.95, 3), (1.0, 4)])
def test_energy_rank(share, expected):
    s = torch.tensor([4.0, 2.0, 1.5, 1.0])  # squares 16, 4, 2.25, 1 of 23.25
    assert energy_rank(s, share) == expected
    assert energy_rank(torch.zeros(3), 0.9) == 0


def known_spectrum(d: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A dense d×n float32 matrix with exactly these singular values (random orthonormal U, V)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, s.numel(), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, s.numel(), generator=g, dtype=torch.float64))
    return ((u * s.double()) @ v.T).float()


def test_randomized_top_svd_matches_the_dense_svd():
    """Tolerance 1e-4 relative to σ₁: float32 subspace iteration on a decaying spectrum (the sketch is far from full)."""
    s = 0.7 ** torch.arange(60, dtype=torch.float64)
    m = known_spectrum(400, 300, s)
    got = lowrank.top_svd(m, 6)
    assert got.U.shape == (400, 6) and got.V.shape == (300, 6)
    assert torch.allclose(got.S.double(), s[:6], rtol=0, atol=1e-4)
    err = torch.linalg.norm(got.dense().double() - m.double())
    assert abs(float(err) - float((s[6:] ** 2).sum().sqrt())) <= 1e-4
    again = lowrank.top_svd(m, 6)  # seeded: the same bits every run
    assert torch.equal(again.U, got.U) and torch.equal(again.S, got.S)


def test_energy_rank_of_a_dense_matrix_grows_its_sketch():
    s = 0.95 ** torch.arange(120, dtype=torch.float64)
    m = known_spectrum(300, 250, s)
    share = (s**2).cumsum(0) / (s**2).sum()
    want = int(torch.searchsorted(share, torch.tensor(0.99, dtype=torch.float64))) + 1
    assert want > 32  # beyond the first sketches of 16 and 32
    got = lowrank.top_svd_for_energy(m, 0.99)
    assert got.S.numel() == want
    assert lowrank.top_svd_for_energy(m, 0.99, max_rank=10).S.numel() == 10


@pytest.mark.parametrize("spectrum", ["gap", "decaying", "flat"])
def test_randomized_top_svd_with_tol_stops_early_within_the_eckart_young_floor(spectrum):
    """extract's early stop: with a clear gap (a fine-tune's ΔW: rank 16 plus rounding noise), a decaying or a flat
    spectrum, the rank-16 error stays within 1% of the optimum (the flat one is as hard as it gets for a sketch)."""
    if spectrum == "gap":
        s = torch.cat([torch.linspace(1.0, 0.6, 16, dtype=torch.float64), torch.full((200,), 1e-3, dtype=torch.float64)])
    elif spectrum == "decaying":
        s = 0.9 ** torch.arange(216, dtype=torch.float64)
    else:
        s = torch.ones(216, dtype=torch.float64)
    m = known_spectrum(600, 400, s)
    got = lowrank.top_svd(m, 16, tol=1e-3)
    floor = float((s[16:] ** 2).sum().sqrt())
    err = float(torch.linalg.norm(got.dense().double() - m.double()))
    assert err <= 1.01 * floor + 1e-5
    assert torch.equal(lowrank.top_svd(m, 16, tol=1e-3).S, got.S)  # seeded


def test_sum_squares_is_accurate_where_a_float32_norm_is_not():
    x = torch.randn(3_000_000, generator=torch.Generator().manual_seed(0)) * 0.01 + 0.001
    exact = float(x.double().pow(2).sum())
    assert abs(lowrank.sum_squares(x) - exact) <= 1e-6 * exact
    assert lowrank.sum_squares(torch.tensor([1.0, float("nan")])) != lowrank.sum_squares(torch.tensor([1.0, float("nan")]))
