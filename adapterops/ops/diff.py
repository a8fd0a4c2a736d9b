"""`diff`: compare two checkpoints or adapters tensor by tensor, streaming, for CI checks of a conversion.

A tensor is within tolerance when it has the same shape and dtype on both sides and every element satisfies
|a − b| ≤ atol + rtol·|b| (NaN matches NaN at the same place). The defaults (atol = rtol = 0) ask for equal
values; `bit_identical` counts the tensors whose bytes are the same.

The relative difference reported per tensor is max |a − b| / max |b|: the largest difference relative to B's
largest magnitude (1 where B is all zeros and A is not). It is finite wherever both tensors are finite (an
element-wise |a − b| / |b| is infinite wherever B holds a zero, and huge near one). Pairs are compared a block of
elements at a time (in float32 for 16-bit tensors, float64 otherwise), with the next pair read meanwhile, so
memory stays near two tensors and the time near that of reading both checkpoints.
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterops.errors import AdapteropsError
from adapterops.io.adapter import find_tensor_file, is_adapter_folder
from adapterops.io.checkpoint import Checkpoint, open_checkpoint, open_tensor_file
from adapterops.io.hub import resolve
from adapterops.pipeline.stream import prefetched, progress
from adapterops.pipeline.threads import compute_threads
from adapterops.result import Result


@dataclass
class TensorDiff:
    """How one tensor present on both sides differs."""

    name: str
    shape: list[int] | None = None  # [a, b] shapes when they differ
    dtype: list[str] | None = None  # [a, b] dtypes when they differ
    max_abs: float | None = None
    max_rel: float | None = None
    mismatched: int = 0  # elements outside the tolerance


@dataclass
class DiffResult(Result):
    """Everything `diff` found; `ok` when every tensor is on both sides and within tolerance."""

    a: str
    b: str
    atol: float
    rtol: float
    tensors: int
    only_in_a: list[str]
    only_in_b: list[str]
    bit_identical: int
    differing: list[TensorDiff] = field(default_factory=list)  # tensors outside the tolerance
    max_abs: float = 0.0
    max_rel: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether A and B agree within tolerance."""
        return not (self.only_in_a or self.only_in_b or self.differing)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict. `max_rel` is max |a − b| / max |b| per tensor (the largest over tensors
        at the top level); an infinite difference (NaN or Inf against a number) is written as null."""
        data = dict(super().to_dict(), ok=self.ok)
        for d in [data, *data["differing"]]:
            for key in ("max_abs", "max_rel"):
                if d[key] is not None and math.isinf(d[key]):
                    d[key] = None
        return data


def open_tensors(path: Path, allow_pickle: bool) -> Checkpoint:
    """A checkpoint folder or file, or a PEFT adapter folder (its tensor file), as a Checkpoint."""
    if is_adapter_folder(path) and (tensor_path := find_tensor_file(path)) is not None:
        src = open_tensor_file(tensor_path, allow_pickle)
        return Checkpoint(path, {tensor_path.name: src}, {k: tensor_path.name for k in src.keys()})
    return open_checkpoint(path, allow_pickle)


BLOCK = 1 << 18  # elements compared at a time: the float working copies stay in cache


def _work_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """float32 when both sides are 16-bit or narrower floats (their differences are exact or nearly so in
    float32), float64 otherwise."""
    small = (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)
    return torch.float32 if a.dtype in small and b.dtype in small else torch.float64


def _compare_exact(x: torch.Tensor, y: torch.Tensor, atol: float, rtol: float) -> tuple[float, int]:
    """(max |a − b|, elements outside tolerance) of a block holding NaN or Inf: NaN matches NaN, Inf matches the
    same Inf, anything else against a NaN is an infinite difference."""
    x, y = x.double(), y.double()
    both_nan = torch.isnan(x) & torch.isnan(y)
    same_inf = torch.isinf(x) & (x == y)
    diff = (x - y).abs().masked_fill_(both_nan | same_inf, 0.0)
    diff = torch.nan_to_num(diff, nan=float("inf"))
    bad = int((diff > atol + rtol * y.abs().nan_to_num(posinf=0.0)).sum())
    return (float(diff.max()) if diff.numel() else 0.0), bad


def compare_tensors(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> tuple[float, float, int]:
    """(max |a − b|, max |a − b| / max |b|, elements outside atol + rtol·|b|); NaN matches NaN.

    The relative figure divides by B's largest finite magnitude (by A's where B is all zeros, which makes it 1), so
    a zero in B does not make it infinite. The work goes a block at a time: no full-size float copy is ever made.
    """
    x, y = a.reshape(-1), b.reshape(-1)
    wd = _work_dtype(x, y)
    max_abs, mag, bad = 0.0, 0.0, 0
    exact = atol == 0 and rtol == 0
    for start in range(0, x.numel(), BLOCK):
        xb, yb = x[start:start + BLOCK].to(wd), y[start:start + BLOCK].to(wd)
        d = torch.sub(xb, yb)
        lo, hi = torch.aminmax(d)  # NaN propagates: a NaN or Inf in either block shows here
        block_abs = max(-float(lo), float(hi))
        if not math.isfinite(block_abs):
            block_abs, block_bad = _compare_exact(xb, yb, atol, rtol)
            finite = yb[torch.isfinite(yb)].abs()
            mag = max(mag, float(finite.max()) if finite.numel() else 0.0)
            max_abs, bad = max(max_abs, block_abs), bad + block_bad
            continue
        lo_y, hi_y = torch.aminmax(yb)
        max_abs, mag = max(max_abs, block_abs), max(mag, -float(lo_y), float(hi_y))
        if block_abs == 0:
            continue
        if exact:
            s = d.sign_()
            bad += int(torch.dot(s, s))  # the nonzero differences (exact in float: a block is < 2**24 elements)
        else:  # d > atol + rtol·|b| exactly when their difference is positive (IEEE subtraction)
            bad += int(d.abs_().sub_(torch.abs(yb).mul_(rtol).add_(atol)).clamp_(min=0).sign_().sum())
    # relative to max |b|; where B is all zeros, to max |a| (= max |a − b|)
    rel = 0.0 if max_abs == 0 else (max_abs / mag if mag > 0 else 1.0) if math.isfinite(max_abs) else math.inf
    return max_abs, rel, bad


def diff(a: str | os.PathLike, b: str | os.PathLike, *, atol: float = 0.0, rtol: float = 0.0,
         ignore_dtype: bool = False, allow_pickle: bool = False, quiet: bool = True) -> DiffResult:
    """Compare every tensor of A and B, one pair at a time (a dtype difference fails unless `ignore_dtype`).

    The next pair is read while this one is compared; `quiet=False` shows a progress bar on a terminal.

    Example::

        adapterops.diff("./merged", "./merged-by-peft", atol=0.0).ok
    """
    if atol < 0 or rtol < 0:
        raise AdapteropsError("--atol and --rtol must not be negative")
    pa, pb = resolve(str(a)), resolve(str(b))
    with ExitStack() as stack:
        ca = stack.enter_context(open_tensors(pa, allow_pickle))
        cb = stack.enter_context(open_tensors(pb, allow_pickle))
        ka, kb = ca.keys(), set(cb.keys())
        common = [k for k in ka if k in kb]
        result = DiffResult(str(a), str(b), atol, rtol, len(common), [k for k in ka if k not in kb],
                            [k for k in cb.keys() if k not in set(ka)], 0)
        sizes = {k: sum(math.prod(c.shape_dtype(k)[0]) * c.shape_dtype(k)[1].itemsize for c in (ca, cb)) for k in common}
        pairs = prefetched(common, lambda k: (ca.read(k), cb.read(k)))
        bar = stack.enter_context(progress(total=sum(sizes.values()), unit="B", desc="diff", quiet=quiet))
        stack.enter_context(compute_threads(torch.device("cpu")))  # a core left to the reader thread
        for name, (x, y) in pairs:
            bar.update(sizes[name])
            d = TensorDiff(name)
            if tuple(x.shape) != tuple(y.shape):
                d.shape = [list(x.shape), list(y.shape)]
                result.differing.append(d)
                continue
            if x.dtype == y.dtype and _same_bytes(x, y):
                result.bit_identical += 1
                continue
            if x.dtype != y.dtype and not ignore_dtype:
                d.dtype = [str(x.dtype).removeprefix("torch."), str(y.dtype).removeprefix("torch.")]
            d.max_abs, d.max_rel, d.mismatched = compare_tensors(x, y, atol, rtol)
            result.max_abs, result.max_rel = max(result.max_abs, d.max_abs), max(result.max_rel, d.max_rel)
            if d.mismatched or d.dtype:
                result.differing.append(d)
    return result


def _same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether two tensors of one dtype and shape hold the same bytes."""
    if x.numel() == 0:
        return True
    return torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8))
