"""`diff`: compare two checkpoints or adapters tensor by tensor, streaming, for CI checks of a conversion.

A tensor is within tolerance when it has the same shape and dtype on both sides and every element satisfies
|a − b| ≤ atol + rtol·|b| (NaN matches NaN at the same place). The defaults (atol = rtol = 0) ask for equal
values; `bit_identical` counts the tensors whose bytes are the same.

The relative difference reported per tensor is max |a − b| / max |b|: the largest difference relative to B's
largest magnitude (1 where B is all zeros and A is not). It is finite wherever both tensors are finite (an
element-wise |a − b| / |b| is infinite wherever B holds a zero, and huge near one). Pairs are compared a block of
elements at a time (in float32 for 16-bit tensors, float64 otherwise): a block whose bytes are equal costs one
memcmp-like pass, any other one pass of |a − b| in a per-thread buffer that stays in cache. The blocks go to one
worker thread per core, the next pair is read (mapped) meanwhile, so memory stays near a few tensors' pages and
the time near that of reading both checkpoints.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adapterops.io.adapter import find_tensor_file, is_adapter_folder
from adapterops.io.checkpoint import Checkpoint, open_checkpoint, open_tensor_file
from adapterops.io.hub import resolve
from adapterops.pipeline.options import check_number
from adapterops.pipeline.stream import prefetched, progress
from adapterops.pipeline.threads import compute_threads, usable_cores
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


BLOCK = 1 << 19  # elements compared at a time: the float working copies (2 MB each in float32) stay in cache
CHUNK = 4 * BLOCK  # elements per task handed to a worker thread


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


_scratch = threading.local()  # per thread: two BLOCK-sized working buffers per work dtype, reused block after block
_INT = {torch.float32: np.int32, torch.float64: np.int64}  # an integer of the work dtype's width


def _buffers(wd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's two working buffers of dtype `wd` (NumPy shares their memory: see `_compare_span`)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    if wd not in bufs:
        bufs[wd] = (torch.empty(BLOCK, dtype=wd), torch.empty(BLOCK, dtype=wd))
    return bufs[wd]


def _finite_mag(y: torch.Tensor) -> float:
    """max |y| over the finite elements (0 when there are none)."""
    finite = y[torch.isfinite(y)].abs()
    return float(finite.max()) if finite.numel() else 0.0


def _same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether two contiguous 1-D tensors of one dtype and length hold the same bytes, compared 8 at a time where
    their length and offsets allow (torch.equal goes a byte at a time on uint8, some 6 times slower)."""
    xb, yb = x.view(torch.uint8), y.view(torch.uint8)
    for wide in (torch.int64, torch.int32, torch.int16):
        n = wide.itemsize
        if xb.numel() % n == 0 and xb.storage_offset() % n == 0 and yb.storage_offset() % n == 0:
            return torch.equal(xb.view(wide), yb.view(wide))
    return torch.equal(xb, yb)


def _compare_span(x: torch.Tensor, y: torch.Tensor, begin: int, end: int, atol: float, rtol: float,
                  same_dtype: bool) -> tuple[bool, float, float, int]:
    """(bytes all equal, max |a − b|, max finite |b|, elements outside tolerance) of elements [begin, end).

    Per block: when both sides share a dtype, a block whose bytes are equal needs no float work beyond max |b|.
    Otherwise both sides are copied into this thread's working buffers, |a − b| is formed in place, and NumPy
    reduces it (its max and count kernels are about twice as fast as torch's on one core): the largest value, and
    in exact mode the count of nonzero ones, read as integers (|·| cleared the sign of any −0).
    """
    wd = _work_dtype(x, y)
    xf_buf, yf_buf = _buffers(wd)
    exact = atol == 0 and rtol == 0
    same, max_abs, mag, bad = same_dtype, 0.0, 0.0, 0
    for start in range(begin, end, BLOCK):
        n = min(BLOCK, end - start)
        xb, yb = x[start:start + n], y[start:start + n]
        yf = yf_buf[:n].copy_(yb)
        yn = yf.numpy()
        if same_dtype and _same_bytes(xb, yb):
            block_mag = max(-float(yn.min()), float(yn.max()))
            mag = max(mag, block_mag if math.isfinite(block_mag) else _finite_mag(yf))
            continue
        same = False
        d = torch.sub(xf_buf[:n].copy_(xb), yf, out=xf_buf[:n]).abs_()
        dn = d.numpy()
        block_abs = float(dn.max())  # NaN propagates: a NaN or Inf in either block shows here
        if not math.isfinite(block_abs):
            block_abs, block_bad = _compare_exact(xb, yb, atol, rtol)
            max_abs, mag, bad = max(max_abs, block_abs), max(mag, _finite_mag(yf)), bad + block_bad
            continue
        max_abs, mag = max(max_abs, block_abs), max(mag, -float(yn.min()), float(yn.max()))
        if block_abs == 0:
            continue
        if exact:
            bad += int(np.count_nonzero(dn.view(_INT[wd])))  # the nonzero differences: +0 is the only zero left
        else:  # |d| > atol + rtol·|b| exactly when their difference is positive (IEEE subtraction)
            bad += int(d.sub_(yf.abs_().mul_(rtol).add_(atol)).clamp_(min=0).sign_().sum())
    return same, max_abs, mag, bad


def _start(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float,
           pool: Executor | None) -> Callable[[], tuple[bool, float, float, int]]:
    """Start comparing a pair in CHUNK-sized tasks on `pool` (inline without one); the function returned waits for
    (bytes all equal, max |a − b|, max |a − b| / max |b|, elements outside tolerance). The figures are maxima and
    integer sums, so they do not depend on the split."""
    x, y = a.reshape(-1), b.reshape(-1)
    same_dtype = x.dtype == y.dtype
    if same_dtype:  # the byte comparison views both as bytes
        x, y = x.contiguous(), y.contiguous()
    spans = [(s, min(s + CHUNK, x.numel())) for s in range(0, x.numel(), CHUNK)]
    if pool is None:
        done = [_compare_span(x, y, s, e, atol, rtol, same_dtype) for s, e in spans]
        parts = [lambda p=p: p for p in done]
    else:
        parts = [pool.submit(_compare_span, x, y, s, e, atol, rtol, same_dtype).result for s, e in spans]

    def finish() -> tuple[bool, float, float, int]:
        results = [part() for part in parts]
        same = same_dtype and all(r[0] for r in results)
        max_abs = max((r[1] for r in results), default=0.0)
        mag = max((r[2] for r in results), default=0.0)
        bad = sum(r[3] for r in results)
        # relative to max |b|; where B is all zeros, to max |a| (= max |a − b|)
        rel = 0.0 if max_abs == 0 else (max_abs / mag if mag > 0 else 1.0) if math.isfinite(max_abs) else math.inf
        return same, max_abs, rel, bad

    return finish


def _compare(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float,
             pool: Executor | None) -> tuple[bool, float, float, int]:
    """(bytes all equal, max |a − b|, max |a − b| / max |b|, elements outside tolerance) of a pair."""
    return _start(a, b, atol, rtol, pool)()


def compare_tensors(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float,
                    pool: Executor | None = None) -> tuple[float, float, int]:
    """(max |a − b|, max |a − b| / max |b|, elements outside atol + rtol·|b|); NaN matches NaN.

    The relative figure divides by B's largest finite magnitude (by A's where B is all zeros, which makes it 1), so
    a zero in B does not make it infinite. The work goes a block at a time: no full-size float copy is ever made.
    """
    return _compare(a, b, atol, rtol, pool)[1:]


def diff(a: str | os.PathLike, b: str | os.PathLike, *, atol: float = 0.0, rtol: float = 0.0,
         ignore_dtype: bool = False, allow_pickle: bool = False, quiet: bool = True) -> DiffResult:
    """Compare every tensor of A and B, one pair at a time (a dtype difference fails unless `ignore_dtype`).

    The next pair is read while this one is compared; `quiet=False` shows a progress bar on a terminal.

    Example::

        adapterops.diff("./merged", "./merged-by-peft", atol=0.0).ok
    """
    atol, rtol = check_number("atol", atol, lo=0), check_number("rtol", rtol, lo=0)  # NaN passes 'atol < 0'
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
        # one torch thread per worker, a worker per core: blocks of a pair are compared in parallel
        stack.enter_context(compute_threads(torch.device("cpu"), 1))
        cores = usable_cores()
        pool = stack.enter_context(ThreadPoolExecutor(cores, thread_name_prefix="adapterops-diff")) if cores > 1 else None

        def record(d: TensorDiff, dtypes: tuple[torch.dtype, torch.dtype], finish) -> None:
            if finish is None:  # shapes differ
                result.differing.append(d)
                return
            same, d.max_abs, d.max_rel, d.mismatched = finish()
            if same:
                result.bit_identical += 1
                return
            if dtypes[0] != dtypes[1] and not ignore_dtype:
                d.dtype = [str(t).removeprefix("torch.") for t in dtypes]
            result.max_abs, result.max_rel = max(result.max_abs, d.max_abs), max(result.max_rel, d.max_rel)
            if d.mismatched or d.dtype:
                result.differing.append(d)

        # Each pair's tasks are queued before the previous pair is recorded and let go (unmapping its pages), so
        # the workers never wait on this thread.
        previous = None
        for name, (x, y) in pairs:
            bar.update(sizes[name])
            d = TensorDiff(name)
            if tuple(x.shape) != tuple(y.shape):
                d.shape = [list(x.shape), list(y.shape)]
                job = (d, (x.dtype, y.dtype), None)
            else:
                job = (d, (x.dtype, y.dtype), _start(x, y, atol, rtol, pool))
            del x, y
            if previous is not None:
                record(*previous)
            previous = job
        if previous is not None:
            record(*previous)
    _scratch.__dict__.pop("bufs", None)  # this thread's buffers, where it compared inline (one core)
    return result

