"""The pure core: PEFT's pattern rule, scales, and the merge maths against their textbook formulas."""

from __future__ import annotations

import math

import pytest
import torch

from adapterops.core.lora import delta_weight, merge_dora, merge_lora
from adapterops.core.scaling import lora_scale, resolve_rank_alpha
from adapterops.pipeline.options import parse_size

NAME = "model.layers.10.self_attn.q_proj"


@pytest.mark.parametrize("key", ["q_proj", "self_attn.q_proj", "layers.1.*q_proj", "k_proj|q_proj", "^model.layers.10.self_attn.q_proj"])
def test_pattern_keys_that_match(key):
    assert resolve_rank_alpha(NAME, 8, 16, {key: 4}, {key: 2}) == (4, 2)


@pytest.mark.parametrize("key", ["^q_proj", "^base_model.model.model.layers.10.self_attn.q_proj", "layers.1.self_attn.q_proj", "proj"])
def test_pattern_keys_that_do_not_match(key):
    assert resolve_rank_alpha(NAME, 8, 16, {key: 4}, {key: 2}) == (8, 16)


def test_first_matching_key_in_file_order_wins():
    assert resolve_rank_alpha(NAME, 8, 16, {"q_proj": 2, "layers.10.self_attn.q_proj": 16}, {})[0] == 2
    assert resolve_rank_alpha(NAME, 8, 16, {"layers.10.self_attn.q_proj": 16, "q_proj": 2}, {})[0] == 16


def test_scales():
    assert lora_scale(16, 32, False) == 2.0
    assert lora_scale(16, 32, True) == 8.0
    assert lora_scale(3, 1, True) == 1 / math.sqrt(3)


def test_delta_layouts_agree_with_formulas():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g)
    torch.testing.assert_close(delta_weight("linear", a, b, 0.5), 0.5 * b @ a)
    torch.testing.assert_close(delta_weight("linear", a, b, 0.5, fan_in_fan_out=True), (0.5 * b @ a).T)
    torch.testing.assert_close(delta_weight("embedding", a, b, 2.0), 2.0 * (b @ a).T)
    ac, bc = torch.randn(4, 3, 3, 3, generator=g), torch.randn(7, 4, 1, 1, generator=g)
    want = torch.einsum("or,rikl->oikl", bc[:, :, 0, 0], ac) * 1.5
    torch.testing.assert_close(delta_weight("conv", ac, bc, 1.5, base_shape=(7, 3, 3, 3)), want)
    a1 = torch.randn(4, 3, 1, 1, generator=g)
    want1 = (bc[:, :, 0, 0] @ a1[:, :, 0, 0])[:, :, None, None] * 1.5
    torch.testing.assert_close(delta_weight("conv", a1, bc, 1.5, base_shape=(7, 3, 1, 1)), want1)


def test_bf16_merge_rounds_once():
    w = torch.randn(8, 8).to(torch.bfloat16)
    d = torch.randn(8, 8) * 1e-3
    want = (w.float() + d).to(torch.bfloat16)
    assert torch.equal(merge_lora(w.clone(), d, "linear"), want)


def test_dora_rows_have_magnitude_norm():
    g = torch.Generator().manual_seed(1)
    w, d = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 0.1
    m = torch.rand(5, generator=g) + 0.5
    merged, norm = merge_dora(w.clone(), d.clone(), m, "linear")
    torch.testing.assert_close(merged.norm(dim=1), m)
    torch.testing.assert_close(norm, (w + d).norm(dim=1))


@pytest.mark.parametrize("text,n", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("123", 123), ("60KB", 60000)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dora", [False, True])
def test_blocked_linear_merge_is_bit_identical_to_peft_order(dtype, dora, threads):
    """The row-blocked CPU path against PEFT's operation order (delta_weight + merge), over many blocks.

    Tolerance: none; the golden tests tie the unblocked path to PEFT itself, this ties the blocked path to it
    on shapes that span many blocks, including a ragged last block.
    """
    from adapterops.core.lora import merge_linear_blocked

    g = torch.Generator().manual_seed(7)
    w = (torch.randn(1000, 300, generator=g) * 0.02).to(dtype)
    a, b = torch.randn(16, 300, generator=g) * 0.05, torch.randn(1000, 16, generator=g) * 0.05
    m = (torch.rand(1000, generator=g) + 0.5) if dora else None
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the merge runs the blocked path with fewer threads than PEFT did
    try:
        got, norm = merge_linear_blocked(w, a, b, 1.7, m, block_rows=64)
    finally:
        torch.set_num_threads(previous)
    delta = delta_weight("linear", a, b, 1.7)
    if dora:
        want, want_norm = merge_dora(w.clone(), delta, m, "linear", norm_base=w)  # the unfused expression
        assert torch.equal(norm, want_norm)
    else:
        want = merge_lora(w.clone(), delta, "linear")
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dora", [False, True])
def test_blocked_merge_on_worker_threads_gives_the_same_bits(dtype, dora):
    """Three Python threads sharing the blocks (into a caller's `out` buffer) give exactly one thread's result: the
    merged weight, the DoRA norms, the change figures and the finite verdict, which still sees an overflow in a
    block some other thread took. Tolerance: none (each block's arithmetic is the same whichever thread does it)."""
    from adapterops.core.lora import merge_linear_blocked_checked

    g = torch.Generator().manual_seed(11)
    w = (torch.randn(1000, 300, generator=g) * 0.02).to(dtype)
    a, b = torch.randn(16, 300, generator=g) * 0.05, torch.randn(1000, 16, generator=g) * 0.05
    m = (torch.rand(1000, generator=g) + 0.5) if dora else None
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_changes: list[float] = []
        want, want_norm, want_ok = merge_linear_blocked_checked(w, a, b, 1.7, m, block_rows=64, changes=one_changes)
        many_changes: list[float] = []
        into = torch.full_like(w, 7.0)
        got, norm, ok = merge_linear_blocked_checked(w, a, b, 1.7, m, block_rows=64, changes=many_changes, out=into, workers=3)
        assert got.data_ptr() == into.data_ptr() and torch.equal(got, want) and ok and want_ok
        assert one_changes == many_changes and one_changes[1] > 0
        if dora:
            assert torch.equal(norm, want_norm)
        if not dora:  # one row of ΔW beyond float16's range (or Inf for the others): only that block sees it
            b_bad = b.clone()
            b_bad[700] = 1e30 if dtype == torch.float16 else float("inf")
            assert not merge_linear_blocked_checked(w, a, b_bad, 1.7, block_rows=64, workers=3)[2]
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("workers", [1, 3])
def test_blocked_dora_unmerge_is_bit_identical_to_the_unfused_expression(dtype, workers):
    """W' / (m / ‖W + ΔW‖) + B·A·(−s) by blocks (`row_divisor`) against unmerge_dora's whole-tensor expression
    (PEFT's unmerge order), with a ragged last block. Tolerance: none (the same operations on each element)."""
    from adapterops.core.lora import dora_factor, merge_linear_blocked_checked, unmerge_dora

    g = torch.Generator().manual_seed(5)
    w = (torch.randn(1000, 300, generator=g) * 0.02).to(dtype)
    a, b = torch.randn(16, 300, generator=g) * 0.05, torch.randn(1000, 16, generator=g) * 0.05
    m, norm = torch.rand(1000, generator=g) + 0.5, torch.rand(1000, generator=g) + 0.5
    want = unmerge_dora(w.to(torch.float32, copy=True), delta_weight("linear", a, b, 1.7), m, norm, "linear").to(dtype)
    divisor = dora_factor(m, norm, "linear", 2, False).reshape(-1)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got, _, ok = merge_linear_blocked_checked(w, a, b, -1.7, block_rows=64, workers=workers, row_divisor=divisor)
    finally:
        torch.set_num_threads(previous)
    assert ok and got.dtype == dtype and torch.equal(got, want)


def test_writer_with_shapes_known_only_at_write_time(tmp_path):
    """Deferred header: a tensor whose length is known only when it arrives (the NF4 quant-state JSON)."""
    import safetensors.torch

    from adapterops.io.safetensors_io import SafetensorsWriter, TensorSpec

    specs = [TensorSpec("a", torch.float32, (3, 2)), TensorSpec("b", torch.uint8, None), TensorSpec("c", torch.bfloat16, (5,))]
    tensors = {"a": torch.randn(3, 2), "b": torch.arange(37, dtype=torch.uint8), "c": torch.randn(5).bfloat16()}
    w = SafetensorsWriter(tmp_path / "x.safetensors", specs, {"format": "pt"})
    for s in specs:
        w.write(s.name, tensors[s.name])
    w.close()
    back = safetensors.torch.load_file(tmp_path / "x.safetensors")  # the reference parser accepts it
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
