"""`diff`: compare two checkpoints or adapters tensor by tensor, streaming, for CI checks of a conversion.

A tensor is within tolerance when it has the same shape and dtype on both sides and every element satisfies
|a − b| ≤ atol + rtol·|b| (NaN matches NaN at the same place). The defaults (atol = rtol = 0) ask for equal
values; `bit_identical` counts the tensors whose bytes are the same.
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
from adapterops.pipeline.stream import prefetched
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
        """A JSON-ready dict (an infinite relative difference, where B is 0, is written as null)."""
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


def compare_tensors(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> tuple[float, float, int]:
    """(max |a − b|, max |a − b| / |b|, elements outside atol + rtol·|b|), in float64; NaN matches NaN."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    both_nan = torch.isnan(x) & torch.isnan(y)
    same_inf = torch.isinf(x) & (x == y)
    diff = (x - y).abs().masked_fill_(both_nan | same_inf, 0.0)
    diff = torch.nan_to_num(diff, nan=float("inf"))
    rel = diff / y.abs()
    rel = torch.where(diff == 0, torch.zeros_like(rel), rel)
    bad = int((diff > atol + rtol * y.abs().nan_to_num(posinf=0.0)).sum())
    return (float(diff.max()) if diff.numel() else 0.0), (float(rel.max()) if rel.numel() else 0.0), bad


def diff(a: str | os.PathLike, b: str | os.PathLike, *, atol: float = 0.0, rtol: float = 0.0,
               ignore_dtype: bool = False, allow_pickle: bool = False) -> DiffResult:
    """Compare every tensor of A and B, one pair at a time (a dtype difference fails unless `ignore_dtype`).

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
        pairs = prefetched(common, lambda k: (ca.read(k), cb.read(k)))
        for name, (x, y) in pairs:
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
