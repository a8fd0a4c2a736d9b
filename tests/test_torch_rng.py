"""bernoulli_masks against torch.bernoulli itself, computed live on this machine: the same masks and the same
generator state after, from any position of the stream. Tolerance: none (they are the same integer draws)."""

from __future__ import annotations

import pytest
import torch

from adapterops.core import torch_rng
from adapterops.core.torch_rng import bernoulli_masks


def reference(shape, count, p, generator):
    full = torch.tensor(p, dtype=torch.float32).expand(*shape)
    return [torch.bernoulli(full, generator=generator, out=torch.empty(*shape, dtype=torch.bool)) for _ in range(count)]


# (seed, shape, masks, p, draws taken before: 0 = fresh generator, 623/624 = at the edge of a regeneration)
CASES = [(0, (300, 257), 2, 0.5, 0), (3, (7, 13), 3, 0.3, 5), (42, (1000,), 1, 0.9, 623), (1, (624 * 3 + 1,), 2, 0.1, 624),
         (9, (5, 5), 2, 0.0, 1), (9, (5, 5), 2, 1.0, 1), (5, (3000,), 1, 1e-7, 0), (6, (20000,), 1, 0.999999, 0),
         (7, (4, 3), 1, 0.7, 10_000)]


@pytest.mark.parametrize("seed,shape,count,p,before", CASES)
def test_masks_and_generator_state_equal_torch_bernoulli(seed, shape, count, p, before):
    ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    if before:
        torch.rand(before, generator=ours)
        torch.rand(before, generator=theirs)
    got = bernoulli_masks(shape, count, p, ours)
    want = reference(shape, count, p, theirs)
    assert all(g.shape == shape and g.dtype == torch.bool and torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(ours.get_state(), theirs.get_state())
    assert torch.equal(torch.rand(7, generator=ours), torch.rand(7, generator=theirs))  # the stream goes on alike


def test_the_default_generator_when_none_is_given():
    saved = torch.random.get_rng_state()
    try:
        torch.manual_seed(11)
        got = bernoulli_masks((50, 40), 2, 0.4, None)
        after = torch.random.get_rng_state()
        torch.manual_seed(11)
        want = reference((50, 40), 2, 0.4, None)
        assert all(torch.equal(g, w) for g, w in zip(got, want)) and torch.equal(after, torch.random.get_rng_state())
    finally:
        torch.random.set_rng_state(saved)


def test_a_state_it_cannot_read_falls_back_to_torch(monkeypatch):
    """Where the generator's state is not the layout read here (another torch), torch.bernoulli itself draws."""
    monkeypatch.setattr(torch_rng, "STATE_BYTES", 1)
    ours, theirs = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    got = bernoulli_masks((30, 30), 2, 0.5, ours)
    assert all(torch.equal(g, w) for g, w in zip(got, reference((30, 30), 2, 0.5, theirs)))
    assert torch.equal(ours.get_state(), theirs.get_state())
