"""NF4 against bitsandbytes 0.50.2's own CUDA outputs (fixtures/nf4, from ../shared/nf4-golden).

Stored goldens, and why that is right here: these bytes come from bitsandbytes' CUDA kernels and define the NF4
format. What we compute from them is CPU-independent: per-block absmax is a max (exact), the codes come from an
IEEE multiply by an IEEE reciprocal and comparisons, the 8-bit nested codes from a search, and dequantization is
one multiply (and one add) per element, rounded once. None of it depends on the CPU's kernels, so the stored bytes
must be met exactly on every machine.

The one reduction is double quantization's offset, torch's `absmax.mean()` on the input's device: its summation
order follows the device's kernels (AVX2, AVX-512, NEON, the GPU's), so it can land 1 ulp from bitsandbytes' GPU
mean, and on which cases depends on the machine. Its reference is therefore computed live: the offset must equal
torch's mean of the golden float32 absmax on this device, exactly; then, with bitsandbytes' offset, every byte
must match. (No stored check of the CPU's mean against the GPU's: it would pass or fail by CPU.)

Tolerance: none. Every case, blocksizes 64/128/256, with and without double quantization: packed codes, absmax,
nested absmax and codes, quant maps, the packed quant-state JSON and the dequantized values, byte for byte.
The golden tests run on the CPU and, where CUDA is present, on the GPU too.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading

import pytest
import torch
from helpers import FIXTURES, read_file

from adapterops.core import nf4

GOLD = read_file(FIXTURES / "nf4" / "golden.safetensors")
HASHES = json.loads((FIXTURES / "nf4" / "hashes.json").read_text())["outputs"]
CASES = sorted({k.split(".")[0] for k in GOLD})
PARAMS = [(c, bs, dq) for c in CASES for bs in (64, 128, 256) for dq in (0, 1)]


def sha(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes."""
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def golden_state(prefix: str) -> nf4.NF4State:
    """The golden quant state, read the way a checkpoint loader reads it."""
    return nf4.state_from_tensors({k.split(".qs.")[1]: v for k, v in GOLD.items() if k.startswith(prefix + ".qs.")})


def assert_matches(prefix: str, packed: torch.Tensor, state: nf4.NF4State) -> None:
    """Every output byte equals bitsandbytes' CUDA output."""
    assert packed.dtype == torch.uint8 and list(packed.shape) == HASHES[prefix + ".packed"]["shape"]
    assert sha(packed) == HASHES[prefix + ".packed"]["sha256"]
    tensors = state.as_tensors()
    for name, value in tensors.items():
        want = GOLD[f"{prefix}.qs.{name}"]
        assert value.dtype == want.dtype and torch.equal(value, want), name
    assert sorted(tensors) == sorted(k.split(".qs.")[1] for k in GOLD if k.startswith(prefix + ".qs."))
    deq = nf4.dequantize(packed, state)
    assert str(deq.dtype).removeprefix("torch.") == HASHES[prefix + ".dequant"]["dtype"]
    assert sha(deq) == HASHES[prefix + ".dequant"]["sha256"]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def moved(state: nf4.NF4State, device: str) -> nf4.NF4State:
    """A quant state with every tensor on `device`."""
    from dataclasses import fields, replace

    return replace(state, **{f.name: getattr(state, f.name).to(device) for f in fields(state)
                             if isinstance(getattr(state, f.name), torch.Tensor)})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,bs,dq", PARAMS, ids=[f"{c}-bs{b}-dq{d}" for c, b, d in PARAMS])
def test_quantize_matches_bitsandbytes_cuda(case, bs, dq, device):
    prefix = f"{case}.bs{bs}.dq{dq}"
    x = GOLD[f"{case}.input"].to(device)
    packed, state = nf4.quantize(x, bs, bool(dq))
    assert packed.device.type == device
    if dq:
        # the offset is a reduction: its reference is this device's torch mean of bnb's (exact) float32 absmax
        assert torch.equal(state.offset, GOLD[f"{case}.bs{bs}.dq0.qs.absmax"].to(device).mean())
        gpu_offset = golden_state(prefix).offset
        if not torch.equal(state.offset.cpu(), gpu_offset):  # this device sums in another order than bnb's GPU did
            packed, state = nf4.quantize(x, bs, True, offset=gpu_offset.to(device))
    assert_matches(prefix, packed.cpu(), moved(state, "cpu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,bs,dq", PARAMS, ids=[f"{c}-bs{b}-dq{d}" for c, b, d in PARAMS])
def test_dequantize_bitsandbytes_state(case, bs, dq, device):
    """bitsandbytes' own quant state (offset included) in, its dequantized bytes out: element-wise, CPU-independent."""
    prefix = f"{case}.bs{bs}.dq{dq}"
    x = GOLD[f"{case}.input"]
    packed, _ = nf4.quantize(x, bs, bool(dq))
    deq = nf4.dequantize(packed.to(device), moved(golden_state(prefix), device))
    assert deq.device.type == device and sha(deq.cpu()) == HASHES[prefix + ".dequant"]["sha256"]


def test_dynamic_map_is_bitsandbytes():
    """A stored hash of a format constant (bitsandbytes' 256-value dynamic map): no CPU can change what it must be."""
    assert hashlib.sha256(nf4.DYNAMIC_MAP.numpy().tobytes()).hexdigest() == "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 63, 64, 1000, 4097])
def test_round_trip_error_within_per_block_bound(dtype, n):
    """|x - deq(q(x))| ≤ absmax · (largest half-gap of the NF4 code) + the output dtype's rounding, per block."""
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) ** 3).to(dtype)
    packed, state = nf4.quantize(x, 64, False)
    err = (nf4.dequantize(packed, state).float() - x.float()).abs()
    half_gap = (nf4.NF4_CODE[1:] - nf4.NF4_CODE[:-1]).max() / 2
    absmax = torch.repeat_interleave(state.absmax, 64)[:n]
    bound = absmax * half_gap * (1 + 1e-6) + absmax * torch.finfo(dtype).eps
    assert bool((err <= bound).all())


def test_bad_arguments():
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize(torch.zeros(8), 100)
    with pytest.raises(ValueError, match="float32"):
        nf4.quantize(torch.zeros(8, dtype=torch.int32))


def formula(packed: torch.Tensor, state: nf4.NF4State) -> torch.Tensor:
    """bitsandbytes' dequantization written element-wise: (code[q] · absmax[block]) in float32, one rounding."""
    q = packed.reshape(-1)
    codes = torch.stack([q >> 4, q & 15], 1).reshape(-1).long()
    blocks = torch.arange(codes.numel()) // state.blocksize
    n = math.prod(state.shape)
    return (state.code[codes] * nf4.block_absmax(state)[blocks])[:n].to(state.dtype).reshape(state.shape)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,bs,dq", [((1000, 333), 64, True), ((4097, 65), 128, False), ((3, 5, 71), 64, False),
                                          ((1024, 2048), 64, True)])
def test_chunked_dequantize_is_the_formula(threads, dtype, shape, bs, dq):
    """The CPU path's chunks, threads, tail and `out=` give the formula's bytes exactly (tolerance: none).

    Small chunks so that these sizes cross many of them, shared by 2 Python threads where torch has 2; odd sizes
    end in a partial block and a partial chunk; (1024, 2048) is 4 MB in bf16, an output advised onto huge pages.
    """
    g = torch.Generator().manual_seed(len(shape) + bs)
    x = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    x.view(-1)[:bs] = 0  # an all-zero block
    packed, state = nf4.quantize(x, bs, dq)
    want = formula(packed, state)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for chunk_blocks in (7, 4096):
            got = nf4.dequantize(packed, state, chunk_blocks=chunk_blocks)
            assert got.shape == want.shape and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            buf = torch.full(shape, 3.0, dtype=dtype)
            into = nf4.dequantize(packed, state, chunk_blocks=chunk_blocks, out=buf)
            assert into.data_ptr() == buf.data_ptr() and torch.equal(buf.view(torch.uint8), want.view(torch.uint8))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_dequantize_off_the_main_thread():
    """A reader thread's dequantize (one loop, torch's setting untouched) gives the same bytes."""
    x = (torch.randn(300, 257, generator=torch.Generator().manual_seed(5)) * 0.05).to(torch.bfloat16)
    packed, state = nf4.quantize(x, 64, True)
    got = {}
    worker = threading.Thread(target=lambda: got.update(t=nf4.dequantize(packed, state, chunk_blocks=5)))
    worker.start()
    worker.join()
    assert torch.equal(got["t"].view(torch.uint8), formula(packed, state).view(torch.uint8))


def test_dequantize_out_must_fit():
    packed, state = nf4.quantize(torch.randn(8, 64), 64, False)
    for bad in (torch.empty(8, 64, dtype=torch.bfloat16), torch.empty(8, 63), torch.empty(64, 8).t()):
        with pytest.raises(ValueError, match="out must be"):
            nf4.dequantize(packed, state, out=bad)


def test_8bit_lookup_is_the_binary_search():
    """Double quantization's sorted lookup gives bitsandbytes' binary search's index for every float32 probed
    (tolerance: none): each comparison value of the search (code values, float32 midpoints of two, ±1) and the
    float32s either side, specials, and every 4099th float32 with |x| ≤ 2 (a 307M-value sweep, every 7th,
    also matched when this was written)."""
    code = nf4.DYNAMIC_MAP
    edges, value, nan = nf4._steps_8bit(code)
    ops = torch.cat([code, torch.tensor([-1.0, 1.0])])
    cand = torch.unique(torch.cat([ops, ((ops[:, None] + ops[None, :]) * 0.5).reshape(-1)]))
    bits = torch.arange(0, 0x40000000, 4099, dtype=torch.int32)
    sweep = torch.cat([bits, bits | torch.tensor(-(2**31), dtype=torch.int32)]).view(torch.float32)
    x = torch.cat([cand, torch.nextafter(cand, torch.tensor(math.inf)), torch.nextafter(cand, torch.tensor(-math.inf)),
                   torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, -1e-45, 1.0000001, -1.0000001]), sweep])
    got = value[torch.searchsorted(edges, x, right=True) - 1].masked_fill_(torch.isnan(x), nan)
    assert torch.equal(got, nf4._search_8bit(x, code).to(torch.uint8))
    assert edges.numel() <= 256


def test_nf4_codes_by_top16_are_the_count():
    """The top-16-bit table gives the count of thresholds strictly below x for every float32 probed (tolerance:
    none): each threshold and the float32s either side, specials, NaN → 0, and every 4099th float32 of both signs
    (a sweep of every 5th, 859M values, also matched when this was written); chunks of 1000 leave a partial one."""
    thr = nf4.NF4_THRESHOLDS
    bits = torch.arange(0, 0x7FC00000, 4099, dtype=torch.int32)
    sweep = torch.cat([bits, bits | torch.tensor(-(2**31), dtype=torch.int32)]).view(torch.float32)
    x = torch.cat([thr, torch.nextafter(thr, torch.tensor(math.inf)), torch.nextafter(thr, torch.tensor(-math.inf)),
                   torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 1.0000001]), sweep])
    want = nf4._nf4_count(x).to(torch.uint8)
    assert torch.equal(nf4._nf4_codes(x), want)
    assert torch.equal(nf4._nf4_codes(x, chunk=1000), want)
