"""Property tests (hypothesis) on the pure core: each law holds for random shapes, ranks, scales and dtypes.

Bounds, per element, in ulps of the stored dtype (see test_unmerge.py for their derivation):
- LoRA merge → unmerge: ≤ 1 ulp of max(|W|, |W'|);
- DoRA merge → unmerge: ≤ ½ ulp(W) + 2 ulp(W + ΔW);
- NF4: |x − dq(q(x))| ≤ ½·(largest gap between NF4 codes)·absmax + |absmax − absmax'| + 1 ulp of the output dtype,
  absmax' being the (double-quantized) absmax the state stores; float64 sums, so the bound is not itself rounded.
Float64 algebra (cat stacking, truncation) agrees to 1e-9 relative.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from helpers import ulp
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterops.core import nf4
from adapterops.core.lora import (
    delta_weight,
    merge_dora,
    merge_lora,
    unmerge_dora,
    unmerge_lora,
)
from adapterops.core.lowrank import (
    cat_factors,
    factors,
    svd_of_product,
    truncation_error,
)
from adapterops.core.scaling import alpha_for, lora_scale

DTYPES = st.sampled_from([torch.bfloat16, torch.float16, torch.float32])
SETTINGS = settings(max_examples=60, deadline=None)


def random_case(seed: int, d: int, k: int, r: int, dtype: torch.dtype, delta_size: float):
    """W (dtype), A, B (float32) and a scale, with ΔW about `delta_size` times W."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(d, k, generator=g) * 0.05).to(dtype)
    a = torch.randn(r, k, generator=g) / math.sqrt(k)
    b = torch.randn(d, r, generator=g) * 0.05 * delta_size
    return w, a, b, 0.5 + torch.rand(1, generator=g).item() * 3


@given(seed=st.integers(0, 2**31), d=st.integers(1, 48), k=st.integers(1, 48), r=st.integers(1, 8), dtype=DTYPES,
       size=st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
@SETTINGS
def test_lora_merge_then_unmerge_within_one_ulp(seed, d, k, r, dtype, size):
    w, a, b, s = random_case(seed, d, k, r, dtype, size)
    delta = delta_weight("linear", a, b, s)
    merged = merge_lora(w.clone(), delta.clone(), "linear")
    back = unmerge_lora(merged.to(torch.float32, copy=True), delta, "linear", dtype).to(dtype)  # it works in place
    bound = ulp(torch.maximum(w.double().abs(), merged.double().abs()), dtype)
    assert bool(((back.double() - w.double()).abs() <= bound).all())


@given(seed=st.integers(0, 2**31), d=st.integers(1, 48), k=st.integers(1, 48), r=st.integers(1, 8), dtype=DTYPES,
       size=st.sampled_from([1e-2, 0.3, 3.0]))
@SETTINGS
def test_dora_merge_then_unmerge_within_the_rounding_the_merge_lost(seed, d, k, r, dtype, size):
    w, a, b, s = random_case(seed, d, k, r, dtype, size)
    g = torch.Generator().manual_seed(seed + 1)
    delta = delta_weight("linear", a, b, s)
    exact = w.double() + delta.double()
    magnitude = exact.norm(dim=1).float() * (0.5 + torch.rand(d, generator=g))
    merged, norm = merge_dora(w.clone(), delta.clone(), magnitude, "linear")
    back = unmerge_dora(merged.to(torch.float32, copy=True), delta, magnitude, norm, "linear").to(dtype)
    bound = 0.5 * ulp(w, dtype) + 2 * ulp(exact, dtype)
    assert bool(((back.double() - w.double()).abs() <= bound).all())


@given(alpha=st.one_of(st.integers(1, 1024).map(float), st.floats(0.01, 1000)),
       r=st.one_of(st.integers(1, 512), st.sampled_from([1, 4, 16, 64, 256])), rs=st.booleans())
@settings(max_examples=300, deadline=None)
def test_rescale_there_and_back(alpha, r, rs):
    """Each leg of standard ⇄ rsLoRA keeps PEFT's scale to within one ulp (the round trip to within two), and exactly
    where √r is a power of two (r = 1, 4, 16, 64, 256). Only alpha can change, and PEFT derives the scale by a
    division that skips some floats, so no alpha reaches them (for integer alphas at r = 8: 183 of 1024)."""
    s = lora_scale(r, alpha, rs)
    there = alpha_for(s, r, not rs)
    back = alpha_for(lora_scale(r, there, not rs), r, rs)
    s2 = lora_scale(r, back, rs)
    assert abs(lora_scale(r, there, not rs) - s) <= math.ulp(s)
    assert abs(s2 - s) <= 2 * math.ulp(s)
    if r in (1, 4, 16, 64, 256):
        assert s2 == s and lora_scale(r, there, not rs) == s


@given(seed=st.integers(0, 2**31), d=st.integers(1, 30), k=st.integers(1, 30),
       ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4), scales=st.lists(st.floats(-3, 3), min_size=4, max_size=4))
@SETTINGS
def test_cat_stacking_equals_the_sum_of_deltas(seed, d, k, ranks, scales):
    g = torch.Generator().manual_seed(seed)
    terms = [(torch.randn(d, r, generator=g, dtype=torch.float64), torch.randn(r, k, generator=g, dtype=torch.float64), s)
             for r, s in zip(ranks, scales)]
    b, a = cat_factors(terms)
    want = sum(s * (bi @ ai) for bi, ai, s in terms)
    assert b.shape == (d, sum(ranks)) and a.shape == (sum(ranks), k)
    assert torch.allclose(b @ a, want, rtol=0, atol=1e-9 * max(1.0, float(want.abs().max())))


@given(seed=st.integers(0, 2**31), d=st.integers(1, 40), k=st.integers(1, 40), r=st.integers(1, 10), keep=st.integers(0, 10))
@SETTINGS
def test_truncation_error_is_the_discarded_singular_values(seed, d, k, r, keep):
    g = torch.Generator().manual_seed(seed)
    b, a = torch.randn(d, r, generator=g, dtype=torch.float64), torch.randn(r, k, generator=g, dtype=torch.float64)
    svd = svd_of_product(b, a, 1.3, torch.float64)
    keep = min(keep, svd.S.numel())
    fb, fa = factors(svd, keep, "balanced")
    err = float(torch.linalg.norm(1.3 * (b @ a) - fb @ fa))
    dense = np.linalg.svd(1.3 * (b @ a).numpy(), compute_uv=False)
    assert abs(err - truncation_error(svd, keep)) <= 1e-9 * max(1.0, dense[0])
    assert abs(err - math.sqrt(float((dense[keep:] ** 2).sum()))) <= 1e-9 * max(1.0, dense[0])


HALF_GAP = float((nf4.NF4_CODE.sort().values.diff().max() / 2).item())


@given(seed=st.integers(0, 2**31), n=st.integers(1, 3000), blocksize=st.sampled_from([64, 128, 256]), dq=st.booleans(),
       dtype=DTYPES, spread=st.sampled_from([1e-3, 1.0, 100.0]))
@SETTINGS
def test_nf4_round_trip_within_the_block_bound(seed, n, blocksize, dq, dtype, spread):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * spread * torch.rand(n, generator=g)).to(dtype)
    packed, state = nf4.quantize(x, blocksize, dq)
    back = nf4.dequantize(packed, state)
    assert back.dtype == dtype and back.shape == x.shape
    nb = math.ceil(n / blocksize)
    pad = nb * blocksize - n
    xb = torch.cat([x.double(), x.new_zeros(pad, dtype=torch.float64)]).view(nb, blocksize)
    true_absmax = xb.abs().amax(dim=1)
    stored = nf4.block_absmax(state).double()
    bound = (HALF_GAP * true_absmax + (true_absmax - stored).abs() + 1e-6 * true_absmax).repeat_interleave(blocksize)[:n]
    bound = bound + ulp(back, dtype)
    assert bool(((back.double() - x.double()).abs() <= bound).all())
