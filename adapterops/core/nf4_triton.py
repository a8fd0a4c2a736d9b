"""Fused NF4 kernels in Triton (the optional `gpu` extra): one pass over the weight for quantize and for dequantize.

The arithmetic is the torch path's (`nf4.py`), operation for operation, so the bytes are bitsandbytes' CUDA
bytes: per block absmax = max|x| ignoring NaN, x·(1/absmax) with an IEEE-rounded reciprocal (`div_rn`), the
code is the number of NF4 thresholds strictly below it (NaN → 0), two codes per byte, high nibble first; and
dequantize computes fl32(code·absmax) and rounds once to the output dtype. Double quantization of the absmax
(n/blocksize values) stays in torch. With TRITON_INTERPRET=1 the same kernels run on the CPU, which is how the
tests check them where no GPU is present.
"""

from __future__ import annotations

import os

import torch

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

ELEMENTS_PER_PROGRAM = 4096


def available(device: torch.device) -> bool:
    """Whether the kernels can run for tensors on this device (a GPU, or any device under TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _quantize_kernel(x_ptr, packed_ptr, absmax_ptr, thr_ptr, n, n_blocks,
                         BS: tl.constexpr, BPP: tl.constexpr):
        """BPP blocks of BS elements per program: absmax, codes and packed bytes in one pass."""
        blk = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)
        offs = blk[:, None] * BS + tl.arange(0, BS)[None, :]
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        a = tl.abs(x)
        absmax = tl.max(tl.where(a != a, 0.0, a), axis=1)  # NaN ignored, as CUDA's fmaxf
        xn = x * tl.math.div_rn(tl.full((BPP,), 1.0, tl.float32), absmax)[:, None]
        code = tl.zeros((BPP, BS), dtype=tl.int32)
        for k in tl.static_range(15):
            code += (xn > tl.load(thr_ptr + k)).to(tl.int32)  # ties go down; NaN compares false → code 0
        hi, lo = tl.split(tl.reshape(code, (BPP, BS // 2, 2)))
        boffs = blk[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]
        tl.store(packed_ptr + boffs, ((hi << 4) | lo).to(tl.uint8), mask=boffs < (n + 1) // 2)
        tl.store(absmax_ptr + blk, absmax, mask=blk < n_blocks)

    @triton.jit
    def _dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BS: tl.constexpr, BYTES: tl.constexpr,
                           BF16_BITS: tl.constexpr):
        """BYTES packed bytes per program → 2·BYTES values fl32(code·absmax), rounded once to the output dtype.

        With BF16_BITS the output is bfloat16 written as its int16 bits, rounded to nearest even by hand: the same
        as the GPU's cvt.rn, and independent of how a backend (the interpreter) converts.
        """
        b = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
        byte = tl.load(packed_ptr + b, mask=2 * b < n, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4))
        lo = tl.load(code_ptr + (byte & 15))
        scale = tl.load(absmax_ptr + (2 * b) // BS, mask=2 * b < n, other=0.0)  # a byte never straddles blocks
        vals = tl.reshape(tl.join(hi * scale, lo * scale), (2 * BYTES,))
        offs = 2 * BYTES * tl.program_id(0).to(tl.int64) + tl.arange(0, 2 * BYTES)
        if BF16_BITS:
            bits = vals.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
            bits = tl.where(vals != vals, 0x7FFF, bits)  # NaN: the canonical NaN of CUDA's __float2bfloat16_rn
            tl.store(out_ptr + offs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=offs < n)
        else:
            tl.store(out_ptr + offs, vals.to(out_ptr.dtype.element_ty), mask=offs < n)


def quantize_blocks(flat: torch.Tensor, blocksize: int, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 ((n+1)//2,), float32 absmax (blocks,)) of a flat float tensor, in one fused pass."""
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    bpp = max(1, ELEMENTS_PER_PROGRAM // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=flat.device)
    grid = (triton.cdiv(n_blocks, bpp),)
    _quantize_kernel[grid](flat, packed, absmax, thresholds.to(flat.device, torch.float32), n, n_blocks, BS=blocksize, BPP=bpp)
    return packed, absmax


def dequantize_flat(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """n values of `dtype` from packed NF4 bytes and float32 per-block absmax, in one fused pass."""
    out = torch.empty(n, dtype=dtype, device=packed.device)
    nbytes = ELEMENTS_PER_PROGRAM // 2
    grid = (triton.cdiv((n + 1) // 2, nbytes),)
    bf16 = dtype == torch.bfloat16
    _dequantize_kernel[grid](packed.reshape(-1), absmax.float().contiguous(), code.to(packed.device, torch.float32),
                             out.view(torch.int16) if bf16 else out, n, BS=blocksize, BYTES=nbytes, BF16_BITS=bf16)
    return out
