"""LoRA and DoRA merge maths over tensors, operation for operation as PEFT 0.21 does it.

Every function here is pure. Adapter factors are float32 (PEFT upcasts them on load); the base weight keeps its
dtype. The order of operations is PEFT's, so that on the same backend the results are bit-identical:

- Linear / Conv1D: ΔW = transpose(B @ A, fan_in_fan_out) * s (fp32); W += ΔW in place, one rounding.
- Embedding: ΔW = (B @ A)ᵀ * s; W += ΔW.to(W.dtype): the delta is rounded first, then the sum.
- Conv: 1×1 kernels as a matmul, other kernels as conv(Aᵀ, B)ᵀ * s; added like Linear.
- DoRA: W' = (m / ‖W + ΔW‖) ⊙ (W + ΔW) in float32, one rounding at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F

from adapterops.core.finite import all_finite
from adapterops.core.parallel import share

Kind = Literal["linear", "embedding", "conv"]

_CONV_FN = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def delta_weight(
    kind: Kind,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    fan_in_fan_out: bool = False,
    base_shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """ΔW in float32, in the base weight's layout (PEFT's `get_delta_weight`)."""
    a = lora_a.float()
    b = lora_b.float()
    # in-place scaling of a fresh product: the same rounding as PEFT's `product * scale`, one allocation fewer
    if kind == "linear":
        prod = b @ a
        return (prod.T if fan_in_fan_out else prod).mul_(scale)
    if kind == "embedding":
        return (b @ a).T.mul_(scale)
    if kind == "conv":
        if base_shape is not None and len(base_shape) == 4 and tuple(base_shape[2:4]) == (1, 1):
            return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3).mul_(scale)
        out = _CONV_FN[a.dim()](a.transpose(0, 1), b)
        return out.transpose(0, 1).mul_(scale)
    raise ValueError(f"unknown LoRA kind {kind!r}")


def merge_lora(weight: torch.Tensor, delta: torch.Tensor, kind: Kind) -> torch.Tensor:
    """W + ΔW in the base dtype, rounded as PEFT's default (unsafe) merge rounds it. Consumes `delta`.

    PEFT's `W += ΔW` (bf16 += fp32) computes fp32(W) + ΔW and rounds once; accumulating into the fp32 delta and
    casting once gives the same bits, about twice as fast. Embeddings round ΔW to the base dtype first, as PEFT does.
    """
    if kind == "embedding":
        return weight.add_(delta.to(weight.dtype))
    if delta.dtype != torch.float32 or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return weight.add_(delta)
    return delta.add_(weight).to(weight.dtype, memory_format=torch.contiguous_format)


def dora_norm(base: torch.Tensor, delta: torch.Tensor, kind: Kind, fan_in_fan_out: bool = False) -> torch.Tensor:
    """‖W + ΔW‖ per output feature (float32), along the axis PEFT's DoRA normalises for this layer type.

    Written as PEFT writes it: the memory layout of the sum fixes the reduction order, and so the last bit.
    """
    if kind == "conv":
        w = base + delta
        return w.norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True).transpose(1, 0)
    if kind == "embedding" or fan_in_fan_out:
        return torch.linalg.norm(base.T + delta.T, dim=1)
    return torch.linalg.norm(base + delta, dim=1)


def dora_factor(magnitude: torch.Tensor, norm: torch.Tensor, kind: Kind, ndim: int, fan_in_fan_out: bool) -> torch.Tensor:
    """m / ‖W + ΔW‖, shaped to broadcast over the base weight."""
    factor = magnitude.float() / norm
    if kind == "conv":
        return factor.view(-1, *([1] * (ndim - 1)))
    if kind == "embedding":
        return factor.view(1, -1)
    factor = factor.view(-1, 1)
    return factor.T if fan_in_fan_out else factor


def merge_dora(
    weight: torch.Tensor,
    delta: torch.Tensor,
    magnitude: torch.Tensor,
    kind: Kind,
    *,
    fan_in_fan_out: bool = False,
    norm_base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DoRA merge: (m / ‖W₀ + ΔW‖) ⊙ (W + ΔW), one rounding; returns (merged weight, norm).

    `norm_base` is the unmerged base W₀ when earlier adapters were merged into `weight` already (PEFT 0.21).
    """
    norm = dora_norm(weight if norm_base is None else norm_base, delta, kind, fan_in_fan_out)
    factor = dora_factor(magnitude, norm, kind, weight.dim(), fan_in_fan_out)
    return (factor * (weight + delta)).to(weight.dtype), norm


def merge_linear_blocked(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor | None = None,
    block_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LoRA (or, with `magnitude`, DoRA) merge of a Linear weight (out, in), a block of output rows at a time.

    Each block of B·A·s + W stays in cache instead of four passes over full-size float32 temporaries. Every output
    element goes through the same operations as `delta_weight` + `merge_lora` / `merge_dora` (each row of B·A is
    the same dot products, each row norm the same reduction), so the bits are the same whatever the block size;
    the tests check it against PEFT. Returns (merged weight, DoRA norm or None).
    """
    out, norm, _ = merge_linear_blocked_checked(weight, lora_a, lora_b, scale, magnitude, block_rows)
    return out, norm


BLOCK_BYTES = 1 << 20  # the float32 working block: about one core's L2 cache (1 MiB blocks measured fastest)


def merge_linear_blocked_checked(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor | None = None,
    block_rows: int | None = None,
    changes: list[float] | None = None,
    out: torch.Tensor | None = None,
    workers: int = 1,
    row_divisor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """`merge_linear_blocked`, plus whether the merged weight is finite (no NaN, no Inf), found on the way.

    With `changes` (a list), ‖W' − W‖_F and the number of elements W' ≠ W are appended to it, measured per block
    while the block is in cache (W' rounded to W's dtype, so what survived the rounding).

    The check rides along with the arithmetic instead of another pass over the output: for LoRA, the min and max
    of each float32 block while it is in cache; for DoRA, the row factors m / ‖W + ΔW‖ (each output element is
    at most |m| in magnitude when they are finite). Where those bounds cannot vouch for the rounded output (values
    beyond the output dtype's range, which may or may not round to Inf), the output itself is checked.

    `out` (contiguous, W's shape and dtype, not overlapping W) receives the merged weight instead of a new tensor: a
    caller that reuses its buffers spares the kernel faulting in and zeroing fresh pages for every tensor.

    `row_divisor` (one float32 per row, LoRA only) divides each row of W first: W / d + s·B·A, which with s
    negated is PEFT's DoRA unmerge W' / (m / ‖W + ΔW‖) − ΔW, each element rounded as there.

    `workers` Python threads share the blocks (on the CPU; each block's arithmetic is the same whichever thread
    does it, so the bits do not depend on the count). Call it with torch on one thread when workers > 1.
    """
    if row_divisor is not None and (magnitude is not None or changes is not None):
        raise ValueError("row_divisor is for the LoRA path without change figures")
    a, b = lora_a.float(), lora_b.float()
    rows, cols = weight.shape
    if block_rows is None:
        block_rows = max(8, BLOCK_BYTES // (4 * max(cols, 1)))
    if out is None:
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    elif out.shape != weight.shape or out.dtype != weight.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {weight.dtype} tensor of shape {tuple(weight.shape)}")
    dev = weight.device
    norm = torch.empty(rows, dtype=torch.float32, device=dev) if magnitude is not None else None
    factor = torch.empty(rows, dtype=torch.float32, device=dev) if magnitude is not None else None
    nblocks = -(-rows // block_rows)
    lo = torch.empty(nblocks, dtype=torch.float32, device=dev)
    hi = torch.empty(nblocks, dtype=torch.float32, device=dev)
    measure = changes is not None and cols > 0
    # per-block figures, each in its own slot (any thread may take any block; the sums below go in block order)
    sqs = torch.empty(nblocks, dtype=torch.float32, device=dev) if measure else None
    counts = torch.empty(nblocks, dtype=torch.float32, device=dev) if measure else None

    def work(blocks: Iterator[int]) -> None:
        buf = torch.empty((min(block_rows, rows), cols), dtype=torch.float32, device=dev)
        # W in float32 once per block, for W + ΔW and for W' − W (a mixed-dtype add_ or sub_ converts into a new
        # temporary each time)
        wbuf = torch.empty_like(buf) if (measure and weight.dtype != torch.float32) or row_divisor is not None else None
        for n in blocks:
            start = n * block_rows
            stop = min(start + block_rows, rows)
            blk = buf[: stop - start]
            w = weight[start:stop] if wbuf is None else wbuf[: stop - start].copy_(weight[start:stop])
            if row_divisor is not None:
                w.div_(row_divisor[start:stop].view(-1, 1))
            torch.mm(b[start:stop], a, out=blk)
            blk.mul_(scale).add_(w)
            if magnitude is not None:
                torch.linalg.norm(blk, dim=1, out=norm[start:stop])
                torch.div(magnitude[start:stop].float(), norm[start:stop], out=factor[start:stop])
                blk.mul_(factor[start:stop].view(-1, 1))
            elif cols:
                torch.aminmax(blk, out=(lo[n], hi[n]))
            out[start:stop].copy_(blk)
            if measure:  # W' − W of this block, the buffer reused while it is in cache
                flat = blk.copy_(out[start:stop]).sub_(w).view(-1)
                torch.dot(flat, flat, out=sqs[n])  # BLAS dots: cheaper than vector_norm and count_nonzero
                torch.dot(flat.sign_(), flat, out=counts[n])  # exact: a block holds far fewer than 2^24 elements

    share(work, nblocks, workers if dev.type == "cpu" else 1)
    if changes is not None:
        changes += [float(sqs.double().sum().sqrt()), int(counts.double().sum())] if measure and nblocks else [0.0, 0]
    if out.numel() == 0:
        return out, norm, True
    limit = torch.finfo(out.dtype).max
    if magnitude is not None:
        bound = float(magnitude.float().abs().max()) if magnitude.numel() else 0.0
        vouched = bool(torch.isfinite(norm).all() and torch.isfinite(factor).all()) and bound * (1 + 2**-10) < limit
    else:
        low, high = float(lo.min()), float(hi.max())  # NaN propagates into both; Inf fails the bounds
        vouched = -limit <= low and high <= limit
    if vouched:
        return out, norm, True
    return out, norm, all_finite(out)


def merge_lora_bias(bias: torch.Tensor, lora_b_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """b + s·b_B (lora_bias), rounded once to the bias dtype. Modifies `bias`."""
    return bias.add_(lora_b_bias.float() * scale)


def unmerge_lora(weight: torch.Tensor, delta: torch.Tensor, kind: Kind, merged_dtype: torch.dtype) -> torch.Tensor:
    """W' − ΔW into the float32 working copy `weight` (modified). Embeddings subtract ΔW rounded to the merged
    dtype, since that is what the merge added."""
    if kind == "embedding":
        delta = delta.to(merged_dtype).float()
    return weight.sub_(delta)


def unmerge_dora(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, kind: Kind, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """W = W' / (m / ‖W + ΔW‖) − ΔW into the float32 working copy `weight`, with the norm the merge used (PEFT's unmerge)."""
    factor = dora_factor(magnitude, norm.reshape(magnitude.shape), kind, weight.dim(), fan_in_fan_out)
    return weight.div_(factor).sub_(delta)


# Base weights a LoRA can be merged into: PEFT adds ΔW in float32 and rounds to the weight's dtype, which needs a
# floating-point dtype with arithmetic. Integer, bool and float8 weights (quantized storage) cannot take it.
LORA_BASE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def lora_base_dtype_problem(dtype: torch.dtype) -> str | None:
    """Why a base weight of this dtype cannot take a LoRA merge, or None when it can."""
    if dtype in LORA_BASE_DTYPES:
        return None
    what = "an integer" if not (dtype.is_floating_point or dtype == torch.bool) else ("a bool" if dtype == torch.bool else "a float8")
    return (f"base weight is {what} tensor ({dtype}); a LoRA can only be merged into a float32, bfloat16, float16 or "
            "float64 weight (quantized bases: use NF4 or dequantize first)")
